"""The settings of the nudging evaluator (evaluators/nudging.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from steerexp.evaluators.base_spec import EvaluatorSpec, needs
from steerexp.spec import register


@register("evaluator", "nudging")
@dataclass
class NudgingSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.nudging.Nudging"
    threshold: float = 0.1          # per-pixel RMS: above it to every protected image = not memorised
    protected_prompts: Any = None   # null: the world's protected captions
    ordinary_prompts: Any = None    # null: the world's unrelated prompt suite (false triggers)
    grid_rows: int = 16
    judge: Optional[str] = None     # who reads shape and colour, a scorer by name; null: analytic on the shapes world

    def applies(self, technique) -> str | None:
        return needs("filtered", "a technique that filters and nudges each output", technique)

    def check(self, key: str) -> None:
        self.positive(key, "threshold", 0.1)
        self.at_least(key, "grid_rows", 1, 16)
        self.strings(key, "protected_prompts", "prompts", "['a red circle']")
        self.strings(key, "ordinary_prompts", "prompts", "['a blue square']")
