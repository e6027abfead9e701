"""The settings of the clip evaluator (evaluators/clip.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerexp.evaluators.base_spec import EvaluatorSpec
from steerexp.spec import register


@register("evaluator", "clip")
@dataclass
class ClipSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.clip.Clip"
    model: Optional[str] = None         # any open_clip model name; null: the shipped tiny CLIP
    pretrained: Optional[str] = None    # a weights file or open_clip tag for `model`
