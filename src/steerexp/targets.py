"""Target images for techniques that learn from examples: a folder of PNG/JPG files (read by
steerexp.images.load_folder), or K images of a class drawn from the shapes world."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from steerexp.images import ImagePolicy, fit, hw, load_folder, to_tensor
from steerexp.worlds.shapes import world


def fit_world(array: np.ndarray, size, pol: ImagePolicy | None = None) -> np.ndarray:
    """A square world array drawn at the longer side of `size` (one side, or (height, width)): an RGB uint8 render
    [S, S, 3] or a bool mask [S, S], fitted to the size per the image policy (images.fit: a centre crop by default)
    as a square image file would be; a mask is fitted the same way (padded with False) and thresholded at half.
    The world draws squares only, so a non-square run's world images and masks all come through here. `pol`: the
    run's image policy (None: the shipped defaults)."""
    H, W = hw(size)
    if array.shape[:2] == (H, W):
        return array
    if array.dtype == bool:
        mask_pol = replace(pol or ImagePolicy(), background=(0, 0, 0))
        im = Image.fromarray(array.astype(np.uint8) * 255).convert("RGB")
        return np.asarray(fit(im, (H, W), mask_pol)[0])[..., 0] > 127
    return np.asarray(fit(Image.fromarray(array), (H, W), pol)[0])


def world_dataset(seed: int, n: int, size, pol: ImagePolicy | None = None, **kw
                  ) -> tuple[np.ndarray, list[world.Scene]]:
    """world.dataset at `size` (one side, or (height, width)): drawn square at the longer side, then fit_world."""
    H, W = hw(size)
    arrays, scenes = world.dataset(seed, n, res=max(H, W), **kw)
    if H != W:
        arrays = np.stack([fit_world(a, (H, W), pol) for a in arrays]) if n else np.zeros((0, H, W, 3), np.uint8)
    return arrays, scenes


def world_targets(k: int, shape: str, seed: int, resolution, pol: ImagePolicy | None = None
                  ) -> tuple[torch.Tensor, list[world.Scene]]:
    """K world images of `shape` with varied colour, size, position and background, and their scenes, at
    `resolution` (one side, or (height, width): world_dataset)."""
    if k < 1:
        raise ValueError(f"technique.targets.k must be >= 1 (K = {k} images requested); use 3-10")
    if shape not in world.SHAPES:
        raise ValueError(f"technique.targets.shape {shape!r} is not a world shape; choose one of {world.SHAPES}")
    images, scenes = world_dataset(seed, k, resolution, pol, shape=shape)
    return to_tensor(images), scenes


def load_targets(folder: str | None, k: int, shape: str, seed: int, resolution, pol: ImagePolicy | None = None):
    """The target images (a folder's, or the world's), read or fitted per the run's image policy `pol`."""
    if folder:
        return load_folder(folder, resolution, "technique.targets.folder", pol)
    return world_targets(k, shape, seed, resolution, pol)
