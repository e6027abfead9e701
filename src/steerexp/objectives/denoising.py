"""denoising: the textual-inversion loss, MSE between the frozen denoiser's prediction and its target
(the noise for epsilon-prediction, the velocity for v-prediction, eps - x0 for flow matching; the
generator's `training_pair` says which),

    loss = mean || eps_theta(noisy(latents, noise, t), t, cond) - target ||^2,   t ~ U[min_timestep, max_timestep)

on the denoising path of `ObjectiveInputs` (generator, latents, cond, rng; cond may be a callable of the drawn
model times, for a conditioning that depends on t: techniques/neti.py). It composes with the
regularisers like any term: `objective=[denoising,delta_l2]` adds an L2 on the learned embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.objectives.denoising_spec import DenoisingSpec
from steerexp.spec import check_settings


class Denoising(Term):
    needs = frozenset({"generator", "latents", "cond", "rng"})

    def __init__(self, weight: float = 1.0, min_timestep: int = 0, max_timestep: int = 1000):
        check_settings(DenoisingSpec, locals(), "objective.terms.denoising")
        super().__init__(weight)
        self.min_timestep, self.max_timestep = min_timestep, max_timestep

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        generator, latents, rng = inputs.generator, inputs.latents, inputs.rng
        hi = min(self.max_timestep, generator.scheduler.config.num_train_timesteps)
        start, stop, full = inputs.rows or (0, len(latents), len(latents))  # draws for the whole step's batch
        noise = torch.randn((full, *latents.shape[1:]), generator=rng)[start:stop].to(latents)
        t = torch.randint(self.min_timestep, hi, (full,), generator=rng)[start:stop].to(latents.device)
        noisy, t_model, target = generator.training_pair(latents, noise, t)
        cond = inputs.cond(t_model) if callable(inputs.cond) else inputs.cond  # per example's t (NeTI)
        pred = generator.denoise(noisy, t_model, cond)
        return F.mse_loss(pred.float(), target.float())
