"""The settings of P+ / XTI (techniques/xti.py), declared once: textual inversion's, and `layers`. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
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

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        count = cross_attention_count(facts)
        if isinstance(self.layers, int) and count is not None and self.layers > count:
            raise ConfigError(f"{key}.layers", f"asks for {self.layers} groups, and this UNet has {count} "
                              "cross-attention layers", f"set {key}.layers to a number in 1..{count}, per_layer or "
                              "per_block")


def cross_attention_count(facts: Facts) -> int | None:
    """How many cross-attention layers (attn2) a UNet has, from unet/config.json as UNet2DConditionModel builds them:
    per cross-attention down block layers_per_block x transformer_layers_per_block, the mid block's last entry, and
    per up block (layers_per_block + 1) x its reversed entry. None when unknown (no local folder, not a UNet)."""
    if facts.folder is None or facts.family not in ("sd", "sdxl"):
        return None
    from steerexp.generators.checks import read_json

    c = read_json(facts.folder / "unet" / "config.json", "generator.path", required=False)
    if not isinstance(c, dict) or not isinstance(c.get("down_block_types"), list):
        return None
    down, up = c["down_block_types"], c.get("up_block_types") or []
    n = len(down)
    each = lambda v, d: list(v) if isinstance(v, (list, tuple)) else [v if v is not None else d] * n
    per_block, depth = each(c.get("layers_per_block", 2), 2), each(c.get("transformer_layers_per_block", 1), 1)
    up_depth = c.get("reverse_transformer_layers_per_block") or list(reversed(depth))
    up_depth = [d[-1] if isinstance(d, (list, tuple)) else d for d in up_depth]
    depth = [d[-1] if isinstance(d, (list, tuple)) else d for d in depth]
    total = sum(per_block[i] * depth[i] for i in range(n) if "CrossAttn" in str(down[i]))
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        total += depth[-1]
    per_up = list(reversed(per_block))
    total += sum((per_up[i] + 1) * up_depth[i] for i in range(len(up)) if "CrossAttn" in str(up[i]))
    return total
