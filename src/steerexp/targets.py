"""Target images for techniques that learn from examples: a folder of PNG/JPG files, or
K images of a class drawn from the shapes world."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from steerexp.pretrain.common import to_tensor
from steerexp.worlds.shapes import world

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_folder(folder: str | Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """All PNG/JPG images of `folder`, RGB, resized to `resolution`, as [K, 3, R, R] in [0, 1]."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"technique.targets.folder: image folder not found: {folder}; "
                                "point it at a folder of PNG/JPG target images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"technique.targets.folder: no PNG/JPG images in {folder} (K = 0); add 3-10 target images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"technique.targets.folder: cannot read image file {f}: {err}; "
                             "remove it or replace it with a valid PNG/JPG") from err
    return to_tensor(np.stack(images)), [f.name for f in files]


def world_targets(k: int, shape: str, seed: int, resolution: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """K world images of `shape` with varied colour, size, position and background, and their scenes."""
    if k < 1:
        raise ValueError(f"technique.targets.k must be >= 1 (K = {k} images requested); use 3-10")
    if shape not in world.SHAPES:
        raise ValueError(f"technique.targets.shape {shape!r} is not a world shape; choose one of {world.SHAPES}")
    images, scenes = world.dataset(seed, k, res=resolution, shape=shape)
    return to_tensor(images), scenes


def load_targets(folder: str | None, k: int, shape: str, seed: int, resolution: int):
    return load_folder(folder, resolution) if folder else world_targets(k, shape, seed, resolution)
