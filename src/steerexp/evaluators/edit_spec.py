"""The settings of the edit evaluator (evaluators/edit.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec, needs
from steerexp.spec import Facts, register


@register("evaluator", "edit")
@dataclass
class EditSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.edit.Edit"
    methods: Any = None     # null: every method the technique offers but the VAE round trip
    # the edited attribute and its new class (edit success); the default edit of the inversion techniques is
    # red -> blue. A preset ties them to its concept (nti_edit)
    head: str = "colour"
    target: str = "blue"
    # heads that must read as on the original (null: shape, size, position)
    keep: Any = field(default_factory=lambda: ["shape", "size", "position"])
    dilate: int = 1         # pixels added around the object mask before measuring the background
    bg_tolerance: float = 0.1   # image files: object = pixels this far from the border colour
    grid_rows: int = 8
    judge: Optional[str] = None  # who reads the attributes, a scorer by name; null: analytic on the shapes world

    def applies(self, technique) -> str | None:
        return needs("invertible", "an inversion technique", technique)

    def check(self, key: str) -> None:
        self.methods_list(key, "methods", "[ddim_w7.5,di+p2p]")
        self.word(key, "head", "colour")
        self.word(key, "target", "blue")
        self.strings(key, "keep", "heads", "[shape,size,position]")
        if self.head in (self.keep or ["shape", "size", "position"]):
            rest = ",".join(h for h in (self.keep or ["shape", "size", "position"]) if h != self.head)
            raise ConfigError(f"{key}.keep", f"lists the edited head {self.head!r}; it cannot also be preserved",
                              f"set {key}.keep=[{rest}]")
        self.at_least(key, "dilate", 0, 1)
        self.fraction(key, "bg_tolerance", 0.1)
        self.at_least(key, "grid_rows", 1, 8)

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        self.p2p_family(key, facts)
