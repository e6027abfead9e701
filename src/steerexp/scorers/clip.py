"""The CLIP scorer: any open_clip model; by default the tiny one trained on the world.

The shipped model is data: an open_clip model config (`shapes-tiny-clip.json`, registered
with `open_clip.add_model_config`), open_clip's own bundled BPE tokenizer, and
`pretrained=` pointing at the shipped weights file.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from steerexp import ASSETS

DEFAULT_DIR = ASSETS / "clip"
DEFAULT_MODEL = "shapes-tiny-clip"
DEFAULT_PRETRAINED = DEFAULT_DIR / "open_clip_model.safetensors"


def register_shipped_config() -> None:
    if DEFAULT_MODEL not in open_clip.list_models():
        open_clip.add_model_config(DEFAULT_DIR / f"{DEFAULT_MODEL}.json")


class CLIPScorer:
    """Normalised image and text embeddings of an open_clip model, for [0, 1] RGB images."""

    def __init__(self, model_name: str = DEFAULT_MODEL, pretrained: str | Path | None = DEFAULT_PRETRAINED,
                 device: str = "cpu"):
        register_shipped_config()
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        weights_file = pretrained is not None and str(pretrained).endswith((".pt", ".bin", ".safetensors"))
        if weights_file and not Path(pretrained).is_file():
            raise FileNotFoundError(f"CLIP weights not found at {pretrained}; "
                                    "pass an existing file or an open_clip pretrained tag")
        self.model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained else None,
                                            device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        self.size = cfg.get("size", self.model.visual.image_size)
        self.size = self.size if isinstance(self.size, int) else self.size[0]
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        self.device = device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bicubic", antialias=True,
                                   align_corners=False)
        return F.normalize(self.model.encode_image((images.clamp(0, 1) - self.mean) / self.std), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)), dim=-1)
