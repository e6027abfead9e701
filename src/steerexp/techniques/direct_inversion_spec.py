"""The settings of Direct Inversion (techniques/direct_inversion.py): DDIM inversion's (ddim_inversion_spec.py),
editing under Prompt-to-Prompt by default. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from steerexp.spec import register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec, EditSpec


@register("technique", "direct_inversion")
@dataclass
class DirectInversionSpec(DDIMInversionSpec):
    """Direct Inversion (Ju et al. 2023, PnP Inversion): DDIM inversion; when editing, the source branch is set back
    onto the inversion trajectory after every step, and P2P carries its attention to the target branch."""

    _target_: str = "steerexp.techniques.direct_inversion.DirectInversion"
    # control: p2p: without attention control the source branch cannot reach the target
    edit: EditSpec = field(default_factory=lambda: EditSpec(control="p2p"))
    guidance_scale: Optional[float] = None   # the edit guidance: null = sampling.guidance_scale
