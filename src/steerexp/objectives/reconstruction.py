"""reconstruction: pixel distance of the decoded images to a target image,

    loss = mean over images and pixels of (image - target)^2   (or |image - target| with l1)

The target is an image file (`image`, resized bilinearly to the size of the generated images; one of
another aspect ratio is first fitted per the `images:` policy, images.fit, as every image file is) or,
when no file is given, a scene of the shapes world rendered at that size (`scene`: shape, colour, size,
position, background; a non-square size is drawn square and fitted the same way: targets.fit_world).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp.images import load_image, read_image, to_tensor
from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.objectives.reconstruction_spec import DISTANCES  # (its settings' rules read them too)
from steerexp.targets import fit_world
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
        self.image = image
        self.target: torch.Tensor | None = None  # read per the run's image policy (bind, or the first step)
        self.distance = distance

    def bind(self, scorers=None, image_policy=None) -> None:
        """The target image is read per the run's image policy (a bad file fails here, before any step)."""
        super().bind(scorers, image_policy)
        self.target = None
        if self.image is not None:
            self.target = load_image(self.image, "objective reconstruction.image", pol=self.image_policy)

    def target_like(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        key, pol = "objective reconstruction.image", self.image_policy
        if self.target is None and self.image is not None:
            self.target = load_image(self.image, key, pol=pol)
        if self.target is None or (self.scene is not None and tuple(self.target.shape[-2:]) != (H, W)):
            self.target = to_tensor(fit_world(world.render(self.scene, max(H, W)), (H, W), pol)[None])
        elif self.scene is None and self.target.shape[-1] * H != self.target.shape[-2] * W:
            self.target = to_tensor(read_image(self.image, key, (H, W), pol)[None])
        target = self.target.to(images)
        if target.shape[-2:] != images.shape[-2:]:
            target = F.interpolate(target, size=images.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        return target.expand_as(images)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        target = self.target_like(inputs.images)
        dist = F.mse_loss if self.distance == "mse" else F.l1_loss
        return dist(inputs.images, target)
