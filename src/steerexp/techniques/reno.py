"""ReNO: reward-based noise optimisation (Eyring et al. 2024, "ReNO: Enhancing One-step
Text-to-Image Models through Reward-based Noise Optimization").

For each output (prompt p, seed s) the initial noise z = x_T is optimised by a few gradient steps
through the sampler, the VAE decoder and the rewards (steerexp.techniques.noise: a weighted sum of
the run's scorers, e.g. the classifier's log p(target) and CLIP similarity to the prompt):

    max_z   reward(D(DDIM_k(p, z)), p)  -  norm_weight * chi_nll(||z||)

chi_nll is the negative log-likelihood of the norm of z under the chi distribution with d degrees
of freedom (the norm of a d-dimensional standard Gaussian), shifted to 0 at its peak
(steerexp.objectives.regularisers.chi_penalty): it keeps z on the Gaussian shell, where the
generator's noise comes from. The optimiser is ReNO's: SGD with Nesterov momentum at `lr`, the
gradient of each output clipped to norm `grad_clip`. DDIM_k runs `opt_sampling_steps` steps (null:
sampling.steps) with gradients, optionally with gradient checkpointing per step.

Budget (calls per output, steerexp.techniques.noise): every iteration samples once (k calls) and,
but for the last, back-propagates (2k, plus k recomputed under `checkpoint`); so n gradient steps cost
(n + 1) k + n (2 + checkpoint) k calls, plus sampling.steps for the final sample when k differs from
them. The technique takes as many steps as `max_calls` affords (at most `iterations` when set).
`keep: best` returns the iterate with the highest reward (the seed's own noise included, so the
reward never ends below the plain sample's), `keep: last` the final one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from steerexp.generators import FrozenGenerator
from steerexp.objectives.regularisers import chi_penalty
from steerexp.techniques.noise import NoiseOptimiser, NoiseRecord
from steerexp.spec import check_settings
from steerexp.techniques.reno_spec import ReNOSpec, final_calls, min_calls, step_calls


class ReNO(NoiseOptimiser):
    def __init__(self, generator: FrozenGenerator, rewards: Mapping | None = None, head: str = "position",
                 target: str = "left", max_calls: int = 160, lr: float = 1.0, momentum: float = 0.9,
                 grad_clip: float | None = 1.0, norm_weight: float = 0.01, iterations: int | None = None,
                 opt_sampling_steps: int | None = 5, checkpoint: bool = False, keep: str = "best",
                 prompts: list[str] | None = None, seeds: list[int] | None = None, batch: int = 16,
                 slot_word: str = "object", sampling: Mapping | None = None):
        check_settings(ReNOSpec, locals())
        super().__init__(generator, rewards, head, target, max_calls, prompts, seeds, batch, slot_word, sampling)
        self.lr, self.momentum, self.grad_clip, self.norm_weight = lr, momentum, grad_clip, norm_weight
        self.opt_steps = int(opt_sampling_steps or self.sampling_steps)
        self.checkpoint, self.keep = bool(checkpoint), keep
        k = self.opt_steps
        self.final_calls = final_calls(k, self.sampling_steps)
        self.iterations = (max_calls - k - self.final_calls) // (self.step_calls())
        if iterations is not None:
            self.iterations = min(self.iterations, iterations)
        self.check_budget(min_calls(k, self.sampling_steps, self.checkpoint),
                          f"one gradient step through {k} sampling steps")

    def step_calls(self) -> int:
        """Calls of one gradient step: its forward, backward (2) and recomputation (checkpointing)."""
        return step_calls(self.opt_steps, self.checkpoint)

    def planned_calls(self) -> int:
        return self.opt_steps + self.iterations * self.step_calls() + self.final_calls

    def optimise(self, texts: list[str], seeds: list[int]) -> list[NoiseRecord]:
        k, n = self.opt_steps, len(texts)
        cond, uncond = self.conditioning(texts)
        z0 = self.plain_latents(seeds)
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        best_r = torch.full((n,), -math.inf)
        best_z, best_img = z0.clone(), None
        forward = backward = 0
        for it in range(self.iterations + 1):
            step = it < self.iterations
            with torch.set_grad_enabled(step):  # the evaluators sample under no_grad
                images = self.sample(cond, z, uncond, k, grad=step, checkpoint=self.checkpoint)
                r = self.reward(images, texts)
                penalty = n * chi_penalty(z) if step and self.norm_weight > 0 else 0.0  # chi_penalty: batch mean
                loss = (-r).sum() + self.norm_weight * penalty
            forward += k
            rd = r.detach().float().cpu()
            if it == 0:
                start_r, best_img = rd.clone(), images.detach().cpu().clone()
            better = (rd > best_r) if self.keep == "best" else torch.ones(n, dtype=torch.bool)
            best_r = torch.where(better, rd, best_r)
            best_z[better] = z.detach()[better]
            best_img[better] = images.detach().cpu()[better]
            if not step:
                break
            opt.zero_grad()
            if not loss.requires_grad:
                names = sorted(self.optimised_against())
                raise ValueError(f"technique.rewards: the reward of {names} has no gradient; ReNO needs "
                                 "differentiable scorers (use technique=noise_search for others)")
            loss.backward()
            backward += 2 * k
            forward += k if self.checkpoint else 0
            if self.grad_clip is not None:
                with torch.no_grad():
                    norms = z.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                    z.grad.mul_(torch.clamp(self.grad_clip / norms, max=1.0).view(-1, *[1] * (z.ndim - 1)))
            opt.step()
        if self.final_calls:  # the output is sampled at sampling.steps from the kept noise
            with torch.no_grad():
                best_img = self.sample(cond, best_z, uncond, self.sampling_steps).cpu()
            forward += self.final_calls
        return [NoiseRecord(best_img[i], best_z[i].cpu(), (best_z[i] - z0[i]).cpu(), float(start_r[i]),
                            float(best_r[i]), forward, backward, 0.0) for i in range(n)]
