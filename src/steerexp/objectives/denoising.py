"""The denoising objective: MSE between the frozen UNet's prediction and its target
(the noise for epsilon-prediction, the velocity for v-prediction), as the scheduler says."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp.generators import FrozenGenerator


class Denoising:
    def __init__(self, weight: float = 1.0, min_timestep: int = 0, max_timestep: int = 1000):
        if not 0 <= min_timestep < max_timestep:
            raise ValueError(f"objective timesteps need 0 <= min_timestep < max_timestep, got {min_timestep}, {max_timestep}")
        self.weight, self.min_timestep, self.max_timestep = weight, min_timestep, max_timestep

    def __call__(self, generator: FrozenGenerator, latents: torch.Tensor, cond: torch.Tensor,
                 rng: torch.Generator) -> torch.Tensor:
        sched = generator.scheduler
        hi = min(self.max_timestep, sched.config.num_train_timesteps)
        noise = torch.randn(latents.shape, generator=rng).to(latents)
        t = torch.randint(self.min_timestep, hi, (len(latents),), generator=rng).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if generator.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = generator.unet(noisy, t, cond).sample
        return self.weight * F.mse_loss(pred.float(), target.float())
