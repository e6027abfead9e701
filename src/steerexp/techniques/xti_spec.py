"""The settings of P+ / XTI (techniques/xti.py), declared once: textual inversion's, and `layers`. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.textual_inversion_spec import TextualInversionSpec

LAYER_MODES = ("per_layer", "per_block")   # or a whole number of groups of consecutive layers (xti.layer_groups)


@register("technique", "xti")
@dataclass
class XTISpec(TextualInversionSpec):
    _target_: str = "steerexp.techniques.xti.XTI"
    # which cross-attention layers share a token: per_layer | per_block | k (k groups of consecutive layers)
    layers: Any = "per_layer"

    def check(self, key: str) -> None:
        super().check(key)
        v = self.layers
        if isinstance(v, bool) or not (v in LAYER_MODES or (isinstance(v, int) and v >= 1)):
            raise ConfigError(f"{key}.layers", f"must be per_layer, per_block or a number of layer groups >= 1, got "
                              f"{v!r}", f"set e.g. {key}.layers=per_layer")
