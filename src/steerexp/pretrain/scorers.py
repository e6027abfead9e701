"""Pretraining of the shipped scorers (steerexp.scorers) on fresh procedural images (held-out
class included): the concept classifier and a tiny open_clip model. Neither sees the generator."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from steerexp.scorers.classifier import ConceptClassifier
from steerexp.scorers.clip import DEFAULT_MODEL
from steerexp.pretrain.common import optimizer_step, training_setup, to_tensor
from steerexp.worlds.shapes import world


def fresh_pool(seed: int, n: int, resolution: int):
    """Fresh world images of every shape, their scenes and label tensors."""
    images, scenes = world.dataset(seed, n, res=resolution)
    labels = {h: torch.tensor([s.labels()[h] for s in scenes]) for h in world.HEADS}
    return to_tensor(images), scenes, labels


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and brightness jitter so the scorers also read generated (decoded) images."""
    b = len(x)
    sigma = torch.rand(b, generator=gen) * 1.0
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    blurred = []
    for i in range(b):
        kk = kern[i]
        img = F.conv2d(
            F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"), kk.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3
        )
        img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), kk.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        blurred.append(img)
    x = torch.cat(blurred)
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    x = x + torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(b, 1, 1, 1, generator=gen)
    return x.clamp(0, 1)


def pretrain_classifier(cfg, out: Path, seed: int, pool) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, _, labels = pool
    model = ConceptClassifier({h: list(c) for h, c in world.HEADS.items()}, width=cfg.width, resolution=x.shape[-1])
    opt, sched, progress = training_setup(model.parameters(), "classifier", cfg.lr, cfg.steps, 1e-4)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        logits = model(degrade(x[idx], gen))
        loss = sum(F.cross_entropy(logits[h], labels[h][idx]) for h in logits)
        progress(step, optimizer_step(opt, sched, loss))
    model.eval()
    model.save_pretrained(out)
    return out


def clip_model_config(cfg, resolution: int) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": resolution, "layers": list(cfg.vision_layers), "width": cfg.vision_width},
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def pretrain_clip(cfg, out: Path, seed: int, pool) -> Path:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, scenes, _ = pool
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / f"{DEFAULT_MODEL}.json"
    config_file.write_text(json.dumps(clip_model_config(cfg, x.shape[-1]), indent=1))
    open_clip.add_model_config(config_file)
    model = open_clip.create_model(DEFAULT_MODEL)
    tokenizer = open_clip.get_tokenizer(DEFAULT_MODEL)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    rng = np.random.default_rng([seed, 2])
    caption_ids = torch.stack(
        [tokenizer([world.caption(s, rng) for _ in range(cfg.captions_per_image)]) for s in scenes]
    )
    opt, sched, progress = training_setup(model.parameters(), "clip", cfg.lr, cfg.steps, 0.05)
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=gen)
        ids = caption_ids[idx, torch.randint(cfg.captions_per_image, (cfg.batch_size,), generator=gen)]
        img = F.normalize(model.encode_image((degrade(x[idx], gen) - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        progress(step, optimizer_step(opt, sched, loss))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out
