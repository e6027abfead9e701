"""The settings of the reconstruction loss (objectives/reconstruction.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.objectives.base_spec import TermSpec
from steerexp.spec import register

DISTANCES = ("mse", "l1")


def scene_choices() -> dict[str, tuple]:
    """The values of each field of a shapes-world scene (the world module: numpy only)."""
    from steerexp.worlds.shapes import world

    return {"shape": tuple(world.SHAPES), "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
            "position": tuple(world.POSITIONS), "background": tuple(world.BACKGROUNDS)}


def scene_problem(scene: Any) -> tuple[str, str] | None:
    """(sub-key, problem) when `scene` is no complete scene of the shapes world, else None."""
    if not isinstance(scene, dict):
        return "", f"must be a mapping of the scene's fields, got {scene!r}"
    choices = scene_choices()
    unknown = sorted(set(scene) - set(choices))
    if unknown:
        return f".{unknown[0]}", f"is not a field of a scene; use {sorted(choices)}"
    missing = sorted(set(choices) - set(scene))
    if missing:
        return "", f"misses the field(s) {missing}"
    for name, value in scene.items():
        if value not in choices[name]:
            return f".{name}", f"unknown {name} {value!r}; choose one of {list(choices[name])}"
    return None


@register("objective", "reconstruction")
@dataclass
class ReconstructionSpec(TermSpec):
    _target_: str = "steerexp.objectives.reconstruction.Reconstruction"
    weight: float = 1.0
    image: Optional[str] = None     # a PNG/JPG file; null: render `scene` from the shapes world
    scene: Any = field(default_factory=lambda: {"shape": "circle", "colour": "red", "size": "large",
                                                "position": "center", "background": "black"})
    distance: str = "mse"           # mse | l1

    def check(self, key: str) -> None:
        super().check(key)
        self.one_of(key, "distance", DISTANCES)
        if self.image is not None:
            return
        if not self.scene:
            raise ConfigError(key, "has no target", f"set {key}.image (a PNG/JPG file) or {key}.scene (a shapes-world "
                              "scene)")
        problem = scene_problem(self.scene)
        if problem:
            raise ConfigError(f"{key}.scene{problem[0]}", problem[1],
                              f"set e.g. {key}.scene={{shape:circle,colour:red,size:large,position:center,"
                              "background:black}")
