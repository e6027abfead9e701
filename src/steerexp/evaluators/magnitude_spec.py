"""The settings of the magnitude evaluator (evaluators/magnitude.py), declared once. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec, needs
from steerexp.spec import register


@register("evaluator", "magnitude")
@dataclass
class MagnitudeSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.magnitude.Magnitude"
    strengths: Any = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
    head: Any = "${concept.head}"       # the run's concept (conf/config.yaml: concept)
    target: Any = "${concept.target}"
    threshold: float = 0.5
    tolerance: float = 0.1              # leakage (flip rate) allowed at the sweet spot
    leakage_prompts: Any = None         # null: the world's unrelated suite
    leakage_heads: Any = None           # attributes whose flips count; null: all
    judge: Optional[str] = None         # who reads the attributes, a scorer by name; null: analytic on the shapes world

    def applies(self, technique) -> str | None:
        return needs("scalable", "a technique with a strength knob", technique)

    def check(self, key: str) -> None:
        s = self.strengths
        if not isinstance(s, list) or not s or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in s):
            raise ConfigError(f"{key}.strengths", f"must be a non-empty list of numbers, got {s!r}",
                              f"set e.g. {key}.strengths=[0.25,0.5,1,2,4]")
        self.fraction(key, "threshold", 0.5)
        self.fraction(key, "tolerance", 0.1)
        self.strings(key, "leakage_heads", "heads", "[shape,colour]")
