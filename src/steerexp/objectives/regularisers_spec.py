"""The settings of the regularisers delta_l2 and proximity (objectives/regularisers.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.objectives.base_spec import TermSpec
from steerexp.spec import register


@register("objective", "delta_l2")
@dataclass
class DeltaL2Spec(TermSpec):
    _target_: str = "steerexp.objectives.regularisers.DeltaL2"
    weight: float = 0.01
    deltas: Any = None          # null: every delta; or a subset, e.g. [text]

    def check(self, key: str) -> None:
        super().check(key)
        d = self.deltas
        if d is not None and (not isinstance(d, list) or not d or not all(isinstance(x, str) and x for x in d)):
            raise ConfigError(f"{key}.deltas", f"must be null (every delta) or a non-empty list of delta names, got "
                              f"{d!r}", f"set e.g. {key}.deltas=[text]")


@register("objective", "proximity")
@dataclass
class ProximitySpec(TermSpec):
    _target_: str = "steerexp.objectives.regularisers.Proximity"
    weight: float = 1.0
    border: Optional[int] = None    # null: the whole image; k: only the frame of the k pixels nearest each edge

    def check(self, key: str) -> None:
        super().check(key)
        b = self.border
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ConfigError(f"{key}.border", f"must be null (the whole image) or a number of pixels >= 1, got "
                              f"{self.border!r}", f"set e.g. {key}.border=3")
