"""The settings of the quality evaluator (evaluators/quality.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

from steerexp.evaluators.base_spec import EvaluatorSpec
from steerexp.spec import register


@register("evaluator", "quality")
@dataclass
class QualitySpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.quality.Quality"
    fid: bool = False               # FID/KID with the concept classifier's features vs fresh world images
    reference_images: int = 512     # fresh world images FID/KID compare with

    def check(self, key: str) -> None:
        self.at_least(key, "reference_images", 2, 512)
