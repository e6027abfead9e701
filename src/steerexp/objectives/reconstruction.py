"""reconstruction: pixel distance of the decoded images to a target image,

    loss = mean over images and pixels of (image - target)^2   (or |image - target| with l1)

The target is an image file (`image`, resized bilinearly to the generator's resolution) or,
when no file is given, a scene of the shapes world rendered at that resolution (`scene`:
shape, colour, size, position, background).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp.images import load_image, to_tensor
from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.objectives.reconstruction_spec import DISTANCES  # (its settings' rules read them too)
from steerexp.worlds.shapes import world

SCENE_CHOICES = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
                 "position": world.POSITIONS, "background": tuple(world.BACKGROUNDS)}


def scene_target(scene: dict) -> world.Scene:
    unknown = set(scene) - set(SCENE_CHOICES)
    if unknown:
        raise ValueError(
            f"objective reconstruction.scene: unknown field(s) {sorted(unknown)}; use {sorted(SCENE_CHOICES)}"
        )
    missing = set(SCENE_CHOICES) - set(scene)
    if missing:
        raise ValueError(f"objective reconstruction.scene: missing field(s) {sorted(missing)}")
    for key, value in scene.items():
        if value not in SCENE_CHOICES[key]:
            raise ValueError(
                f"objective reconstruction.scene: unknown {key} {value!r}; choose one of {list(SCENE_CHOICES[key])}"
            )
    return world.Scene(**scene)


class Reconstruction(Term):
    def __init__(self, image: str | None = None, scene: dict | None = None, distance: str = "mse", weight: float = 1.0):
        super().__init__(weight)
        if distance not in DISTANCES:
            raise ValueError(f"objective reconstruction: distance must be one of {DISTANCES}, got {distance!r}")
        if image is None and not scene:
            raise ValueError(
                "objective reconstruction needs a target: set objective.terms.reconstruction.image "
                "(a PNG/JPG file) or .scene (a shapes-world scene)"
            )
        self.scene = None if image is not None else scene_target(dict(scene))
        self.target = load_image(image, "objective reconstruction.image") if image is not None else None
        self.distance = distance

    def target_like(self, images: torch.Tensor) -> torch.Tensor:
        res = images.shape[-1]
        if self.target is None or (self.scene is not None and self.target.shape[-1] != res):
            self.target = to_tensor(world.render(self.scene, res)[None])
        target = self.target.to(images)
        if target.shape[-2:] != images.shape[-2:]:
            target = F.interpolate(target, size=images.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        return target.expand_as(images)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        target = self.target_like(inputs.images)
        dist = F.mse_loss if self.distance == "mse" else F.l1_loss
        return dist(inputs.images, target)
