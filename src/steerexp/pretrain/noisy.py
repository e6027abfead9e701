"""Pretraining of the timestep-aware classifier (steerexp.scorers.noisy): fresh world images
(held-out class included) are encoded once by the generator's VAE (posterior mean and std);
every step draws a latent from the posterior, a timestep t uniformly from the scheduler's
train timesteps, noise, and trains on

    z_t = sqrt(alpha_bar_t) * z_0 + sqrt(1 - alpha_bar_t) * noise

with the sum of the heads' cross-entropies, as Dhariwal & Nichol (2021) train their noisy
classifiers. `accuracy_by_t` reports per-head accuracy against t (the asset's check).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler

from steerexp import ASSETS
from steerexp.pretrain.common import optimizer_step, training_setup
from steerexp.scorers.noisy import NoisyClassifier
from steerexp.worlds.shapes import world


def generator_folder(out: Path) -> Path:
    """The generator the classifier reads latents of: the one this recipe just built into `out`,
    else the shipped one."""
    return out / "shapes" if (out / "shapes" / "model_index.json").is_file() else ASSETS / "shapes"


def load_vae_and_schedule(folder: Path) -> tuple[AutoencoderKL, torch.Tensor]:
    """The generator's frozen VAE and its scheduler's alphas_cumprod [num_train_timesteps]."""
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    return vae, scheduler.alphas_cumprod.float()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """[0, 1] images -> scaled posterior (mean, std), as FrozenGenerator.encode_images scales them."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    s = vae.config.scaling_factor
    return torch.cat(means) * s, torch.cat(stds) * s


def add_noise(z0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def pretrain_noisy_classifier(cfg, out: Path, seed: int, pool, generator: Path) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, _, labels = pool
    vae, alphas = load_vae_and_schedule(generator)
    mean, std = encode(vae, x)
    model = NoisyClassifier({h: list(c) for h, c in world.HEADS.items()}, latent_channels=mean.shape[1],
                            latent_size=mean.shape[-1], width=cfg.width, time_dim=cfg.time_dim,
                            num_train_timesteps=len(alphas))
    opt, sched, progress = training_setup(model.parameters(), "classifier_noisy", cfg.lr, cfg.steps, 1e-4)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        t = torch.randint(len(alphas), (cfg.batch_size,), generator=gen)
        zt = add_noise(z0, t, alphas, torch.randn(z0.shape, generator=gen))
        logits = model(zt, t)
        loss = sum(F.cross_entropy(logits[h], labels[h][idx]) for h in logits)
        progress(step, optimizer_step(opt, sched, loss))
    model.eval()
    model.save_pretrained(out)
    return out


@torch.no_grad()
def accuracy_by_t(model: NoisyClassifier, latents: torch.Tensor, labels: dict[str, torch.Tensor],
                  alphas_cumprod: torch.Tensor, buckets: int = 10, seed: int = 0) -> list[dict]:
    """Per-head accuracy in `buckets` equal ranges of t: each latent is noised once at a t drawn
    uniformly within each range. One row per range: {t_lo, t_hi, <head>: accuracy}."""
    gen = torch.Generator().manual_seed(seed)
    n_t = len(alphas_cumprod)
    rows = []
    for b in range(buckets):
        lo, hi = b * n_t // buckets, (b + 1) * n_t // buckets
        t = torch.randint(lo, hi, (len(latents),), generator=gen)
        zt = add_noise(latents, t, alphas_cumprod, torch.randn(latents.shape, generator=gen))
        logits = model(zt, t)
        rows.append({"t_lo": lo, "t_hi": hi - 1,
                     **{h: float((logits[h].argmax(-1) == labels[h]).float().mean()) for h in logits}})
    return rows
