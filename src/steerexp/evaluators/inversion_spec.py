"""The settings of the inversion evaluator (evaluators/inversion.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp.evaluators.base_spec import EvaluatorSpec, needs
from steerexp.spec import register



@register("evaluator", "inversion")
@dataclass
class InversionSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.inversion.Inversion"
    methods: Any = None     # null: every method the technique offers (vae, ddim_w1, ddim_w<w>, npi[, nti])
    grid_rows: int = 8

    def applies(self, technique) -> str | None:
        return needs("invertible", "an inversion technique", technique)

    def check(self, key: str) -> None:
        self.methods_list(key, "methods", "[vae,ddim_w1,npi]", inversion_only=True)
        self.at_least(key, "grid_rows", 1, 8)
