"""Plain DDIM sampling and inversion, k-diffusion style: short functions you can read.

`denoise(x, t)` is any function returning the (guided) noise prediction; the loops only
know the scheduler's alphas_cumprod and timesteps. They run with or without gradients;
`checkpoint=True` recomputes each step's activations in the backward pass, so memory grows
with the latent size, not with the number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """The DDIM timesteps of one sampling run and the alphas_cumprod around them."""
    timesteps: torch.Tensor        # [S] descending
    alphas: torch.Tensor           # [S] alphas_cumprod at each timestep
    alphas_prev: torch.Tensor      # [S] alphas_cumprod at the next (less noisy) timestep

    @classmethod
    def from_scheduler(cls, scheduler, steps: int) -> "Schedule":
        if steps < 1:
            raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
        scheduler.set_timesteps(steps)
        ts = scheduler.timesteps.long().cpu()
        ac = scheduler.alphas_cumprod.float().cpu()
        final = getattr(scheduler, "final_alpha_cumprod", ac[0])
        final = torch.as_tensor(final, dtype=torch.float32)
        prev = torch.cat([ac[ts[1:]], final.view(1)])
        return cls(ts, ac[ts], prev)


def split_prediction(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, prediction_type: str):
    """(eps, x0) from a model output of either prediction type."""
    a, s = alpha.sqrt(), (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return out, (x - s * out) / a
    if prediction_type == "v_prediction":
        return a * out + s * x, a * x - s * out
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def ddim_step(eps: torch.Tensor, x0: torch.Tensor, alpha_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) to the previous timestep."""
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def ddim_sample(model_output: Denoise, x: torch.Tensor, schedule: Schedule, prediction_type: str = "epsilon",
                checkpoint: bool = False, callback: Callable | None = None) -> torch.Tensor:
    """Run DDIM from x_T down to x_0. `model_output(x, t, i)` returns the guided model output."""
    for i, t in enumerate(schedule.timesteps):
        alpha = schedule.alphas[i].to(x)
        alpha_prev = schedule.alphas_prev[i].to(x)

        def step(x_in: torch.Tensor, i=i, t=t, alpha=alpha, alpha_prev=alpha_prev) -> torch.Tensor:
            eps, x0 = split_prediction(model_output(x_in, t, i), x_in, alpha, prediction_type)
            return ddim_step(eps, x0, alpha_prev)

        x = _checkpoint(step, x, use_reentrant=False) if checkpoint and torch.is_grad_enabled() else step(x)
        if callback is not None:
            callback(i, t, x)
    return x


def ddim_invert(
    model_output: Denoise, x0: torch.Tensor, schedule: Schedule, prediction_type: str = "epsilon"
) -> list[torch.Tensor]:
    """DDIM inversion from a clean latent up to x_T; returns the trajectory [x_0, ..., x_T]
    (index k is the latent before sampling step S-k)."""
    xs = [x0]
    x = x0
    ts, alphas, alphas_prev = schedule.timesteps.flip(0), schedule.alphas.flip(0), schedule.alphas_prev.flip(0)
    for i, t in enumerate(ts):
        a_from, a_to = alphas_prev[i].to(x), alphas[i].to(x)
        eps, _ = split_prediction(model_output(x, t, len(ts) - 1 - i), x, a_to, prediction_type)
        x0_pred = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = a_to.sqrt() * x0_pred + (1 - a_to).sqrt() * eps
        xs.append(x)
    return xs
