"""Target images for techniques that learn from examples: a folder of PNG/JPG files (read by
steerexp.images.load_folder), or K images of a class drawn from the shapes world."""
from __future__ import annotations

import torch

from steerexp.images import load_folder, to_tensor
from steerexp.worlds.shapes import world


def world_targets(k: int, shape: str, seed: int, resolution: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """K world images of `shape` with varied colour, size, position and background, and their scenes."""
    if k < 1:
        raise ValueError(f"technique.targets.k must be >= 1 (K = {k} images requested); use 3-10")
    if shape not in world.SHAPES:
        raise ValueError(f"technique.targets.shape {shape!r} is not a world shape; choose one of {world.SHAPES}")
    images, scenes = world.dataset(seed, k, res=resolution, shape=shape)
    return to_tensor(images), scenes


def load_targets(folder: str | None, k: int, shape: str, seed: int, resolution: int):
    if folder:
        return load_folder(folder, resolution, "technique.targets.folder")
    return world_targets(k, shape, seed, resolution)
