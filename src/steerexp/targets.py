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


def image_files_in(folder: Path) -> list[Path]:
    """The PNG/JPG files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(folder: str | Path, resolution: int, key: str = "technique.targets.folder") -> tuple[torch.Tensor, list[str]]:
    """All PNG/JPG images of `folder`, RGB, resized to `resolution`, as [K, 3, R, R] in [0, 1].
    `key` is the config setting named in error messages."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: image folder not found: {folder}; point it at a folder of PNG/JPG images")
    files = image_files_in(folder)
    if not files:
        raise ValueError(f"{key}: no PNG/JPG images in {folder} (K = 0); add some")
    images = [np.asarray(read_rgb(f, key).resize((resolution, resolution), Image.BICUBIC)) for f in files]
    return to_tensor(np.stack(images)), [f.name for f in files]


def read_rgb(path: Path, key: str) -> Image.Image:
    """One image file as an RGB PIL image; unreadable files are a clear error naming `key`."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{key}: cannot read image file {path}: {err}; "
                         "remove it or replace it with a valid PNG/JPG") from err


def load_image(path: str | Path, key: str) -> torch.Tensor:
    """One RGB image file at its own size as [1, 3, H, W] in [0, 1]; `key` names the config field in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}: image not found: {path}; give an existing PNG/JPG file")
    return to_tensor(np.asarray(read_rgb(path, key))[None])


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
