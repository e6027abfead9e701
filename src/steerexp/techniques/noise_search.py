"""Verifier-guided noise search (Ma et al. 2025, "Inference-Time Scaling for Diffusion Models
beyond Scaling Denoising Steps"): spend more generator calls on searching for a better initial
noise, scored by a verifier; no gradients.

For each output (prompt p, seed s), with the verifier the reward of steerexp.techniques.noise
(a weighted sum of the run's scorers; any scorer works, differentiable or not):

1. Random search (best-of-N): sample `candidates` noises, candidate 0 being the seed's own x_T
   (so the plain sample is one of them) and the others fresh Gaussian noises drawn from (seed, j);
   sample each at sampling.steps and keep the one the verifier scores highest: the pivot.
2. Zero-order search around the pivot: each round draws `neighbours` noises at radius `radius`
   from it, y = sqrt(1 - radius^2) * pivot + radius * e (e fresh Gaussian, so y is again a
   standard Gaussian sample when the pivot is), samples and scores them, and moves the pivot to
   the best of them if it beats the pivot; rounds go on while the budget lasts.

Budget (calls per output, steerexp.techniques.noise): every scored noise is one sample at
sampling.steps calls; `max_calls` buys max_calls // sampling.steps of them, the first `candidates`
for step 1, the rest for step 2 (candidates = that number: best-of-N alone). The output is the
pivot's sample, scored on the way: no extra call.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from steerexp.generators import FrozenGenerator
from steerexp.techniques.noise import NoiseOptimiser, NoiseRecord
from steerexp.spec import check_settings
from steerexp.techniques.noise_search_spec import NoiseSearchSpec, min_calls

RANDOM, LOCAL = 1, 2  # streams of candidate noise per seed: best-of-N candidates, local-search perturbations


class NoiseSearch(NoiseOptimiser):
    def __init__(self, generator: FrozenGenerator, rewards: Mapping | None = None, head: str = "position",
                 target: str = "left", max_calls: int = 160, candidates: int = 8, neighbours: int = 4,
                 radius: float = 0.5, seed: int = 0, prompts: list[str] | None = None, seeds: list[int] | None = None,
                 batch: int = 16, slot_word: str = "object", sampling: Mapping | None = None):
        check_settings(NoiseSearchSpec, locals())
        super().__init__(generator, rewards, head, target, max_calls, prompts, seeds, batch, slot_word, sampling)
        self.candidates, self.neighbours, self.radius, self.seed = candidates, neighbours, float(radius), seed
        self.check_budget(min_calls(candidates, self.sampling_steps),
                          f"best-of-{candidates} at sampling.steps={self.sampling_steps}")
        self.evaluations = max_calls // self.sampling_steps  # noises scored per output

    def planned_calls(self) -> int:
        return self.evaluations * self.sampling_steps

    def noise(self, seed: int, stream: int, j: int) -> torch.Tensor:
        """A standard Gaussian x_T drawn from (technique seed, output seed, stream, j): the same whatever the batch."""
        state = np.random.SeedSequence([self.seed, int(seed), stream, j]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(state))
        return torch.randn(self.generator.latent_shape(), generator=g)

    @torch.no_grad()
    def score(self, cond, uncond, z, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [N, 3, H, W] on the CPU, rewards [N]) of noises z [N, ...] for texts."""
        images = self.sample(cond, z.to(self.generator.device), uncond, self.sampling_steps)
        return images.cpu(), self.reward(images, texts).float().cpu()

    @torch.no_grad()
    def optimise(self, texts: list[str], seeds: list[int]) -> list[NoiseRecord]:
        n, steps = len(texts), self.sampling_steps
        cond, uncond = self.conditioning(texts)
        z0 = self.plain_latents(seeds).cpu()
        # 1. best-of-N: candidate 0 is the seed's own noise
        cands = torch.stack([torch.stack([z0[i]] + [self.noise(s, RANDOM, j) for j in range(1, self.candidates)])
                             for i, s in enumerate(seeds)])  # [n, N, ...]
        flat = cands.flatten(0, 1)
        rep = lambda t: t.repeat_interleave(len(flat) // n, 0)  # noqa: E731  one row per candidate
        images, rewards = self.score(rep(cond), uncond, flat, [t for t in texts for _ in range(self.candidates)])
        images, rewards = images.view(n, self.candidates, *images.shape[1:]), rewards.view(n, self.candidates)
        best = rewards.argmax(1)
        idx = torch.arange(n)
        pivot, pivot_r, pivot_img = cands[idx, best], rewards[idx, best], images[idx, best]
        start_r = rewards[:, 0]
        # 2. zero-order search around the pivot, in rounds of `neighbours` while the budget lasts
        left, rnd, a = self.evaluations - self.candidates, 0, math.sqrt(1 - self.radius ** 2)
        while left > 0:
            m = min(self.neighbours, left)
            eps = torch.stack([torch.stack([self.noise(s, LOCAL, rnd * self.neighbours + j) for j in range(m)])
                               for s in seeds])  # [n, m, ...]
            ys = a * pivot[:, None] + self.radius * eps
            rep = lambda t: t.repeat_interleave(m, 0)  # noqa: E731
            im, r = self.score(rep(cond), uncond, ys.flatten(0, 1), [t for t in texts for _ in range(m)])
            im, r = im.view(n, m, *im.shape[1:]), r.view(n, m)
            j = r.argmax(1)
            move = r[idx, j] > pivot_r
            pivot[move], pivot_r[move], pivot_img[move] = ys[idx, j][move], r[idx, j][move], im[idx, j][move]
            left, rnd = left - m, rnd + 1
        calls = self.evaluations * steps
        return [NoiseRecord(pivot_img[i], pivot[i].clone(), pivot[i] - z0[i], float(start_r[i]), float(pivot_r[i]),
                            calls, 0, 0.0) for i in range(n)]
