"""Target images for techniques that learn from examples: a folder of PNG/JPG files, or
K images of a class drawn from the shapes world."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from steerexp import images as image_policy
from steerexp.pretrain.common import to_tensor
from steerexp.worlds.shapes import world

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files_in(folder: Path) -> list[Path]:
    """The PNG/JPG files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(folder: str | Path, resolution: int, key: str = "technique.targets.folder") -> tuple[torch.Tensor, list[str]]:
    """All PNG/JPG images of `folder`, RGB, fitted to `resolution` per the `images:` policy
    (steerexp.images: 16-bit, alpha, EXIF, crop/pad, size limits), as [K, 3, R, R] in [0, 1].
    `key` is the config setting named in error messages."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{key}: image folder not found: {folder}; point it at a folder of PNG/JPG images")
    files = image_files_in(folder)
    if not files:
        raise ValueError(f"{key}: no PNG/JPG images in {folder} (K = 0); add some")
    return to_tensor(image_policy.read_images(files, key, resolution)), [f.name for f in files]


def read_rgb(path: Path, key: str) -> Image.Image:
    """One image file as an RGB PIL image at its own size, read per the `images:` policy
    (steerexp.images); unreadable files are a clear error naming `key`."""
    return Image.fromarray(image_policy.read_image(path, key))


def load_image(path: str | Path, key: str) -> torch.Tensor:
    """One RGB image file at its own size (read per the `images:` policy, steerexp.images) as
    [1, 3, H, W] in [0, 1]; `key` names the config field in errors."""
    return to_tensor(image_policy.read_image(path, key)[None])


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
