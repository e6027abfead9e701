"""The timestep-aware concept classifier: it reads the generator's noisy latents z_t and the
timestep t, for classifier guidance in the style of Dhariwal & Nichol (2021):

    eps'(z_t) = eps(z_t) - s * sqrt(1 - alpha_t) * d log p(y | z_t, t) / d z_t

It reads latents, not images, so the guidance loop needs no VAE decode and no x0-estimate:
the gradient is the classifier's own, taken where the sampler is. It is trained on world
images encoded by the generator's VAE and noised by its scheduler at random t
(steerexp.pretrain.noisy), so it belongs to one generator: its config records the latent
shape it reads, and a caller checks it against the generator's.

A model is data: `config.json` (heads, latent shape, widths, number of train timesteps) plus
`model.safetensors`. The network is a small residual CNN on the latent grid whose blocks are
modulated (scale and shift) by a sinusoidal embedding of t, GroupNorm and SiLU throughout
(smooth in its input, so its gradients are usable at every step).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from steerexp import ASSETS
from steerexp.scorers.classifier import HeadClassifier, load_folder, save_folder

DEFAULT_PATH = ASSETS / "classifier_noisy"


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (float) timesteps [B]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, conv; the time embedding scales and shifts the middle."""

    def __init__(self, channels: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * channels)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        r = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        r = self.norm2(r) * (1 + scale) + shift
        return h + self.conv2(F.silu(r))


class NoisyClassifier(HeadClassifier):
    """forward(latents [B, C, S, S], timesteps [B] or a scalar) -> {head: logits}."""

    def __init__(self, heads: dict[str, list[str]], latent_channels: int = 4, latent_size: int = 8,
                 width: int = 48, time_dim: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.heads = {name: list(classes) for name, classes in heads.items()}
        self.latent_channels, self.latent_size = latent_channels, latent_size
        self.width, self.time_dim, self.num_train_timesteps = width, time_dim, num_train_timesteps
        w = width
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(latent_channels, w, 3, padding=1)
        self.block1 = TimeBlock(w, time_dim)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.block2 = TimeBlock(2 * w, time_dim)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        side = ((latent_size + 1) // 2 + 1) // 2  # after two stride-2 convs
        self.norm = nn.GroupNorm(8, 2 * w)
        self.fc = nn.Linear(2 * w * side * side + time_dim, 128)
        self.out = nn.ModuleDict({name: nn.Linear(128, len(c)) for name, c in self.heads.items()})

    def check_latents(self, latents: torch.Tensor, key: str = "latents") -> None:
        want = (self.latent_channels, self.latent_size, self.latent_size)
        if latents.ndim != 4 or tuple(latents.shape[1:]) != want:
            raise ValueError(f"{key}: the timestep-aware classifier reads latents [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"of the generator it was trained for; got shape {tuple(latents.shape)}")

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int | float) -> dict[str, torch.Tensor]:
        self.check_latents(latents)
        t = torch.as_tensor(timesteps, device=latents.device).float().reshape(-1).expand(len(latents))
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.block1(self.stem(latents), temb)
        h = self.block2(self.down1(F.silu(h)), temb)
        h = F.silu(self.norm(self.down2(F.silu(h))))
        h = F.silu(self.fc(torch.cat([h.flatten(1), temb], dim=-1)))
        return {name: head(h) for name, head in self.out.items()}

    def log_prob(self, latents: torch.Tensor, timesteps, head: str, target: str) -> torch.Tensor:
        """log p(head = target | z_t, t) per latent [B]; differentiable in the latents."""
        idx = self.class_index(head, target)
        return self(latents, timesteps)[self.head_name(head)].log_softmax(-1)[:, idx]

    def probs(self, latents: torch.Tensor, timesteps=0) -> dict[str, torch.Tensor]:
        return {name: logits.softmax(-1) for name, logits in self(latents, timesteps).items()}

    def predict(self, latents: torch.Tensor, timesteps=0) -> dict[str, list[str]]:
        return {n: [self.heads[n][i] for i in l.argmax(-1).tolist()] for n, l in self(latents, timesteps).items()}

    def config(self) -> dict:
        return {"heads": self.heads, "latent_channels": self.latent_channels, "latent_size": self.latent_size,
                "width": self.width, "time_dim": self.time_dim, "num_train_timesteps": self.num_train_timesteps}

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(self, folder, {"kind": "noisy", **self.config()})

    @classmethod
    def from_pretrained(cls, folder: str | Path = DEFAULT_PATH) -> "NoisyClassifier":
        return load_folder(cls, folder, "noisy", what="timestep-aware classifier",
                           build="`steerexp-pretrain stages=[classifier_noisy]`",
                           other="an image classifier, not a timestep-aware one")
