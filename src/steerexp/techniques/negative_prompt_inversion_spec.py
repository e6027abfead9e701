"""The settings of negative-prompt inversion (techniques/negative_prompt_inversion.py): DDIM inversion's
(ddim_inversion_spec.py), with the guidance of the run. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerexp.spec import register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec


@register("technique", "negative_prompt_inversion")
@dataclass
class NegativePromptInversionSpec(DDIMInversionSpec):
    """Negative-prompt inversion (Miyake et al.): null := the source-prompt embedding, no optimisation."""

    _target_: str = "steerexp.techniques.negative_prompt_inversion.NegativePromptInversion"
    guidance_scale: Optional[float] = None   # the reconstruction / edit guidance: null = sampling.guidance_scale
