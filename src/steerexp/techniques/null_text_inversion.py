"""Null-text inversion (Mokady et al., CVPR 2023): reconstruct a real image under strong
guidance by optimising only the unconditional ("null-text") embedding, one per timestep.

Stage I, pivot: DDIM inversion at w = 1 with the source prompt c gives x*_0 .. x*_T
(ddim_inversion.py). Stage II, per sampling step i (timestep t, from T down to 1), starting
from x_bar_T = x*_T and null = the empty prompt's embedding:

    eps(null)   = eps_theta(x_bar_t, t, null) + w (eps_theta(x_bar_t, t, c) - eps_theta(x_bar_t, t, null))
    step(null)  = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1}) eps(null),
    x0_hat      = (x_bar_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    null_t      = argmin_null || step(null) - x*_{t-1} ||^2       (Adam, `inner_steps` at most)
    x_bar_{t-1} = step(null_t)

As in the paper's Algorithm 1, the step starts from x_bar_t, the latent NTI's own sampler has
reached (x*_T at first), so the error of earlier steps is corrected rather than accumulated.
Details: the conditional prediction is computed once per step (it does not depend on the
null); the learning rate decays linearly, lr_i = lr (1 - lr_decay i / S); each step
warm-starts from the previous step's null; an image stops early once its loss is below
early_stop + i * early_stop_growth (it then takes no further updates and drops out of the
batch); images are optimised together in batches of `batch_size` (their losses are summed,
so each image's null gets its own gradient). With `budget.max_norm`, every Adam step is followed by
the projection of null_t - null_empty onto that ball, per token row (steerexp.techniques.budgets).

Deltas (deltas.safetensors): `null_embeddings` [N, S, L, D] (one [S, L, D] per image) and
`latents_T` [N, C, h, w]. Reconstruction samples from latents_T with (c, null_t, w); editing
swaps c for the target prompt and keeps the nulls.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from steerexp.generators import FrozenGenerator
from steerexp.techniques.budgets import Budget
from steerexp.techniques.ddim_inversion import DDIMInversion


class NullTextInversion(DDIMInversion):
    """DDIM inversion at w = 1, then per-step null embeddings that close the guided trajectory."""

    @classmethod
    def requirements(cls, cfg):
        return super().requirements(cfg) | {
            "cfg": "null-text inversion optimises the unconditional branch's embedding, and this family's guidance "
                   "is distilled (no unconditional branch); use ddim_inversion"}

    def __init__(
        self,
        generator: FrozenGenerator,
        inner_steps: int = 10,
        lr: float = 5e-2,
        lr_decay: float = 0.5,
        early_stopping: bool = True,
        early_stop: float = 5e-4,
        early_stop_growth: float = 2e-5,
        budget: dict | Budget | None = None,
        **kwargs,
    ):
        super().__init__(generator, **kwargs)
        if lr <= 0:
            raise ValueError(f"technique.lr must be positive, got {lr}")
        if inner_steps < 1:
            raise ValueError(
                f"technique.inner_steps must be >= 1, got {inner_steps}; for no optimisation use "
                "technique=negative_prompt_inversion or technique=ddim_inversion"
            )
        if not 0 <= lr_decay < 1:
            raise ValueError(f"technique.lr_decay must be in [0, 1), got {lr_decay}")
        if early_stop < 0 or early_stop_growth < 0:
            raise ValueError("technique.early_stop and early_stop_growth must be >= 0")
        self.inner_steps, self.lr, self.lr_decay = inner_steps, lr, lr_decay
        self.budget = Budget.from_config(budget)  # ||null_t - null_empty|| per token row
        self.early_stopping, self.early_stop, self.early_stop_growth = early_stopping, early_stop, early_stop_growth
        L, D = generator.cond_shape
        self.null_embeddings = nn.Parameter(torch.zeros(0, self.sampling_steps, L, D), requires_grad=False)
        self.history: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ optimisation
    def compute(self) -> None:
        self.invert()
        start = time.process_time()
        S = self.sampling_steps
        nulls = torch.zeros(len(self.x0), S, *self.empty.shape[1:])
        hist = {k: torch.zeros(len(self.x0), S) for k in ("loss_start", "loss_end", "loss_empty", "inner_steps")}
        for sl in self.batches():
            out = self.optimise_batch(sl)
            nulls[sl] = out.pop("nulls")
            for k, v in out.items():
                hist[k][sl] = v
        self.null_embeddings = nn.Parameter(nulls, requires_grad=False)
        self.history = {k: v.mean(0).tolist() for k, v in hist.items()}  # per step, mean over images
        self.seconds["nti"] = time.process_time() - start  # the optimisation alone (seconds["invert"]: the pivot)
        self._cache.clear()

    def step_to(self, x, t, out_c, null, schedule, i):
        """The guided sampler step from x with this null (differentiable in null)."""
        gen = self.generator
        out_u = gen.denoise(x, t, null.to(gen.dtype))
        guided = self.guidance.combine(out_c, out_u, i, self.sampling_steps)
        return schedule.step(*schedule.split(guided, x, i), i)

    def optimise_batch(self, sl: slice) -> dict[str, torch.Tensor]:
        """Algorithm 1 of Mokady et al. for the images `sl`, all at once."""
        gen, S = self.generator, self.sampling_steps
        schedule = gen.schedule(S)
        cond, x = self.cond[sl], self.pivots[-1][sl].detach()
        n = len(x)
        empty = self.empty.expand(n, -1, -1).detach()
        null = empty.clone()
        rec = {k: torch.zeros(n, S) for k in ("loss_start", "loss_end", "loss_empty", "inner_steps")}
        nulls = torch.zeros(n, S, *empty.shape[1:])
        for i, t in enumerate(schedule.timesteps):
            t = t.to(gen.device)
            target = self.pivots[S - 1 - i][sl]
            with torch.no_grad():
                out_c = gen.denoise(x, t, cond)
                loss_of = lambda nl: (
                    (self.step_to(x, t, out_c, nl, schedule, i) - target).pow(2).flatten(1).mean(1)
                )
                rec["loss_empty"][:, i] = loss_of(empty).float().cpu()
            null = self.optimise_step(x, t, out_c, null, target, schedule, i, empty, rec)
            with torch.no_grad():
                x_next = self.step_to(x, t, out_c, null, schedule, i)
                rec["loss_end"][:, i] = (x_next - target).pow(2).flatten(1).mean(1).float().cpu()
            nulls[:, i] = null.float().cpu()
            x = x_next  # x_bar_{t-1}: where NTI's own sampler is
        return {"nulls": nulls, **rec}

    def optimise_step(self, x, t, out_c, null, target, schedule, i, empty, rec) -> torch.Tensor:
        """Adam on this step's null (warm start `null`); images that reach the threshold stop."""
        S = self.sampling_steps
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=self.lr * (1 - self.lr_decay * i / S))
        threshold = self.early_stop + i * self.early_stop_growth
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        kept = null.detach().clone()  # the value of each image's null once it stops
        for j in range(self.inner_steps):
            if not bool(active.any()):
                break
            idx = active.nonzero().squeeze(1)
            per = (
                (self.step_to(x[idx], t, out_c[idx], null[idx], schedule, i) - target[idx])
                .pow(2)
                .flatten(1)
                .mean(1)
            )
            if j == 0:
                rec["loss_start"][:, i] = 0.0
                rec["loss_start"][idx.cpu(), i] = per.detach().float().cpu()
            done = per.detach() < threshold if self.early_stopping else torch.zeros_like(per, dtype=torch.bool)
            if bool(done.all()):
                active[idx] = False
                break
            loss = per[~done].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec["inner_steps"][idx[~done].cpu(), i] += 1
            with torch.no_grad():
                active[idx[done]] = False
                kept[active] = null[active]
                null[~active] = kept[~active]  # stopped images take no momentum step
                if self.budget.max_norm is not None:
                    null.copy_(empty + self.budget.clip(null - empty))
        return null.detach()

    # ------------------------------------------------------------------ use
    def methods(self) -> list[str]:
        return super().methods() + ["nti"]

    def own_method(self) -> str:
        return "nti"

    def nulls(self, method: str, sl: slice):
        if method == "nti":
            if len(self.null_embeddings) == 0:
                raise RuntimeError("null-text inversion has no optimised nulls yet: call compute() (or load deltas)")
            return self.null_embeddings[sl], self.guidance
        return super().nulls(method, sl)

    def budgeted(self) -> dict[str, torch.Tensor]:
        if len(self.null_embeddings) == 0 or self.empty is None:
            return {}
        return {"null_embeddings": self.null_embeddings - self.empty.float().cpu()[:, None]}

    def diagnostics(self) -> dict[str, float]:
        """The optimisation (mean per-step latent MSE with the empty null, the warm start and the optimised
        null; inner steps taken), where the nulls went (mean over steps of ||null_t - c|| / ||null_empty - c||:
        below 1, they moved toward the source prompt c, NPI's premise) and the CPU seconds per image (pivot and
        optimisation).
        Empty when the nulls were loaded rather than computed."""
        if not self.history:
            return {}
        h = {k: np.asarray(v) for k, v in self.history.items()}
        nulls = self.null_embeddings.float()  # [N, S, L, D]
        c, e = self.cond.float().cpu()[:, None], self.empty.float().cpu()[:, None]
        ratio = ((nulls - c).norm(dim=-1).mean(-1) / (e - c).norm(dim=-1).mean(-1).clamp(min=1e-8)).mean()
        return {
            "step_mse_empty_null": float(h["loss_empty"].mean()),
            "step_mse_warm_start": float(h["loss_start"].mean()),
            "step_mse_optimised": float(h["loss_end"].mean()),
            "inner_steps_per_step": float(h["inner_steps"].mean()),
            "null_to_prompt_ratio": float(ratio),
            "seconds_per_image": self.inversion_seconds("nti"),
        }

    def parameter_counts(self) -> dict[str, int]:
        """Learned values: one null [L, D] per image and step (known once the targets are loaded)."""
        n = len(self.images) if self.images is not None else len(self.null_embeddings)
        per_image = self.null_embeddings.shape[1:].numel()  # S * L * D
        return {"trainable": n * per_image, "frozen": self.generator.num_parameters()}
