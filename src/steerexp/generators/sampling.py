"""Deterministic sampling and inversion for every family, k-diffusion style: short functions you can read.

Every family writes a noisy latent the same way, x_t = a_t x0 + b_t eps:
  - variance preserving (DDPM/DDIM, epsilon or v prediction): a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar);
  - flow matching (rectified flow, SD3 and FLUX): a = 1 - sigma, b = sigma, and the model predicts the
    velocity v = eps - x0.
A `Schedule` holds (a, b) at each sampling step and at the step after it, and the prediction type, so one
step rule serves both: split the model output into (eps, x0), then x_prev = a_prev x0 + b_prev eps. For
DDIM this is the deterministic DDIM update (eta = 0); for flow matching it is exactly the Euler step
x + (sigma_prev - sigma) v. Inversion runs the same rule backwards (DDIM inversion; the flow-ODE inversion).

The schedule follows the scheduler config as diffusers' DDIMScheduler / FlowMatchEulerDiscreteScheduler read it
(checks.check_scheduler refuses, before loading, what is not followed): the timesteps (timestep_spacing,
steps_offset; the flow shift, dynamic shift, shift_terminal and karras/exponential/beta sigmas via the
scheduler's own set_timesteps), each DDIM step's previous timestep as DDIMScheduler.step computes it
(t - num_train_timesteps // steps; below 0: set_alpha_to_one's final alpha), the alphas (rescale_betas_zero_snr,
trained_betas), the prediction type, and the x0 limit of DDIMScheduler.step: thresholding
(dynamic_thresholding_ratio, sample_max_value), else clip_sample to [-clip_sample_range, clip_sample_range].
The limit applies to the x0 each step moves to (`step`), and inversion limits its x0 the same way.

`model_output(x, t, i)` is any function returning the (guided) model output at step i. The loops run with
or without gradients; `checkpoint=True` recomputes each step's activations in the backward pass, so memory
grows with the latent size, not with the number of steps.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

ModelOutput = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True)
class Schedule:
    """The steps of one sampling run: model time values and the (a, b) noise coefficients around them."""
    timesteps: torch.Tensor        # [S] the model's time input at each step, from noisiest
    signal: torch.Tensor           # [S] a_i
    noise: torch.Tensor            # [S] b_i
    signal_prev: torch.Tensor      # [S] a at the next (less noisy) step
    noise_prev: torch.Tensor       # [S] b at the next step
    prediction_type: str = "epsilon"
    clip_range: float | None = None                # clip_sample: x0 clamped to [-r, r] before each step
    threshold: tuple[float, float] | None = None   # thresholding: (dynamic_thresholding_ratio, sample_max_value)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; "
                             f"expected one of {PREDICTION_TYPES}")

    def __len__(self) -> int:
        return len(self.timesteps)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_ddim(cls, scheduler, steps: int) -> "Schedule":
        """The DDIM steps of a variance-preserving scheduler (its alphas_cumprod and prediction type)."""
        _check_steps(steps)
        scheduler.set_timesteps(steps)  # timestep_spacing and steps_offset, as DDIMScheduler reads them
        config = scheduler.config
        ts = scheduler.timesteps.long().cpu()
        ac = scheduler.alphas_cumprod.float().cpu()  # rescale_betas_zero_snr / trained_betas applied
        final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", ac[0]), dtype=torch.float32)
        # DDIMScheduler.step's previous timestep: t - T // steps (the next timestep under "leading" spacing, not
        # always under "trailing" or "linspace"), set_alpha_to_one's final alpha below 0
        prev_t = ts - config.num_train_timesteps // steps
        prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], final)
        now = ac[ts]
        vp = lambda a: (a.sqrt(), (1 - a).sqrt())
        clip = float(config.clip_sample_range) if getattr(config, "clip_sample", False) else None
        threshold = ((float(config.dynamic_thresholding_ratio), float(config.sample_max_value))
                     if getattr(config, "thresholding", False) else None)
        return cls(ts, *vp(now), *vp(prev), config.prediction_type, clip, threshold)

    @classmethod
    def from_flow(cls, scheduler, steps: int, mu: float | None = None, sigmas: list[float] | None = None) -> "Schedule":
        """The Euler steps of a flow-matching scheduler: its shifted sigmas (from `sigmas` when given, as the
        FLUX pipeline gives them; `mu` for dynamic shifting)."""
        _check_steps(steps)
        kw = {"mu": mu} if getattr(scheduler.config, "use_dynamic_shifting", False) else {}
        if sigmas is not None:
            kw["sigmas"] = list(sigmas)
        scheduler.set_timesteps(None if sigmas is not None else steps, **kw)
        sigmas = scheduler.sigmas.double().cpu()  # [S + 1], ending at 0
        now, prev = sigmas[:-1], sigmas[1:]
        return cls(scheduler.timesteps.float().cpu(), (1 - now).float(), now.float(), (1 - prev).float(),
                   prev.float(), "flow")

    # ------------------------------------------------------------------ the step rule
    def coefficients(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.signal[i].to(like), self.noise[i].to(like)

    def split(self, out: torch.Tensor, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) at step i from a model output of this schedule's prediction type."""
        a, b = self.coefficients(i, x)
        if self.prediction_type == "epsilon":
            return out, (x - b * out) / a
        if self.prediction_type == "v_prediction":
            return a * out + b * x, a * x - b * out
        return x + a * out, x - b * out  # flow: v = eps - x0

    def output(self, eps: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """The model output at step i that `split` reads as this eps (the inverse of `split`; undefined at pure
        noise, a = 0, where every x0 gives the same x)."""
        a, b = self.coefficients(i, x)
        if self.prediction_type == "epsilon":
            return eps
        x0 = (x - b * eps) / a
        return a * eps - b * x0 if self.prediction_type == "v_prediction" else eps - x0

    def limit(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 as DDIMScheduler.step uses it: thresholded (thresholding), else clipped (clip_sample), else as is."""
        if self.threshold is not None:
            return threshold_sample(x0, *self.threshold)
        if self.clip_range is not None:
            return x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def step(self, eps: torch.Tensor, x0: torch.Tensor, i: int) -> torch.Tensor:
        """The deterministic update to the next step: a_prev limit(x0) + b_prev eps (eps as predicted: DDIMScheduler
        does not re-derive it from a clipped x0)."""
        return self.signal_prev[i].to(x0) * self.limit(x0) + self.noise_prev[i].to(x0) * eps

    def noised(self, x0: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """x at step i for a clean latent and a noise (SDEdit's start)."""
        a, b = self.coefficients(i, x0)
        return a * x0 + b * eps

    def starting_at(self, k: int) -> "Schedule":
        """The same run from its step k on."""
        return dataclasses.replace(self, timesteps=self.timesteps[k:], signal=self.signal[k:], noise=self.noise[k:],
                                   signal_prev=self.signal_prev[k:], noise_prev=self.noise_prev[k:])


def threshold_sample(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen), exactly as DDIMScheduler._threshold_sample: per sample, s = the `ratio`
    quantile of |x0| clamped to [1, max_value]; x0 clamped to [-s, s] and divided by s."""
    dtype = x0.dtype
    batch, channels, *rest = x0.shape
    flat = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    flat = flat.reshape(batch, channels * math.prod(rest))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(batch, channels, *rest).to(dtype)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")


def flow_shift_mu(image_seq_len: int, config) -> float:
    """FLUX's resolution-dependent shift: mu linear in the number of latent patches (the scheduler's
    base/max_image_seq_len and base/max_shift)."""
    c = lambda k, d: getattr(config, k, None) if getattr(config, k, None) is not None else d
    lo_n, hi_n = c("base_image_seq_len", 256), c("max_image_seq_len", 4096)
    lo, hi = c("base_shift", 0.5), c("max_shift", 1.15)
    m = (hi - lo) / (hi_n - lo_n)
    return float(image_seq_len * m + (lo - m * lo_n))


def sample(model_output: ModelOutput, x: torch.Tensor, schedule: Schedule, checkpoint: bool = False,
           callback: Callable | None = None) -> torch.Tensor:
    """From x at the schedule's first step down to x0. `model_output(x, t, i)` returns the guided output."""
    for i, t in enumerate(schedule.timesteps):

        def step(x_in: torch.Tensor, i=i, t=t) -> torch.Tensor:
            eps, x0 = schedule.split(model_output(x_in, t, i), x_in, i)
            return schedule.step(eps, x0, i)

        x = _checkpoint(step, x, use_reentrant=False) if checkpoint and torch.is_grad_enabled() else step(x)
        if callback is not None:
            callback(i, t, x)
    return x


def invert(model_output: ModelOutput, x0: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
    """Inversion from a clean latent up to the first step's x; returns the trajectory [x_0, ..., x_T]
    (index k is the latent before sampling step S-k). Each step reads the model at the noisier end, from
    the current x: DDIM inversion for variance-preserving models, the flow-ODE (Euler) inversion for flow."""
    xs, x, S = [x0], x0, len(schedule)
    for k in range(S):
        i = S - 1 - k  # the sampling step this inversion step undoes
        a_from, b_from = schedule.signal_prev[i].to(x), schedule.noise_prev[i].to(x)
        out = model_output(x, schedule.timesteps[i], i)
        if schedule.prediction_type == "flow":  # v read at x's own level: exactly x + (sigma_i - sigma_from) v
            eps, x0_pred = x + a_from * out, x - b_from * out
        else:  # DDIM inversion: eps as read at step i's level, x0 from x's level, limited as sampling limits it
            eps, _ = schedule.split(out, x, i)
            x0_pred = schedule.limit((x - b_from * eps) / a_from)
        x = schedule.noised(x0_pred, eps, i)
        xs.append(x)
    return xs
