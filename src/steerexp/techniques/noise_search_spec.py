"""The settings of verifier-guided noise search (techniques/noise_search.py), declared once, and its call budget.
Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.noise_spec import NoiseSpec


def min_calls(candidates: int, steps: int) -> int:
    """Calls per output of the best-of-N step: every candidate sampled at sampling.steps."""
    return candidates * steps


@register("technique", "noise_search")
@dataclass
class NoiseSearchSpec(NoiseSpec):
    """Verifier-guided noise search: best-of-N initial noises, then a zero-order local search around the best (code:
    steerexp/techniques/noise_search.py; rewards and call counting: steerexp/techniques/noise.py)."""

    _target_: str = "steerexp.techniques.noise_search.NoiseSearch"
    max_calls: int = 300            # generator calls per output: max_calls // sampling.steps noises are scored
    candidates: int = 8             # best-of-N (the seed's own noise is one of them)
    neighbours: int = 4             # noises per round of the local search (the rest of the budget)
    radius: float = 0.5             # a neighbour is sqrt(1 - radius^2) * best + radius * fresh noise
    seed: Any = "${seed}"           # draws the candidate and neighbour noises (with each output's seed)

    def check(self, key: str) -> None:
        super().check(key)
        self.at_least(key, "candidates", 1, "8 (1: the seed's own noise only)")
        self.at_least(key, "neighbours", 1, 4)
        r = self.radius
        if not (isinstance(r, (int, float)) and 0 < r <= 1):
            raise ConfigError(f"{key}.radius", f"must be in (0, 1] (the share of fresh noise in a neighbour), got "
                              f"{r!r}", f"set e.g. {key}.radius=0.5")

    def calls_needed(self, steps: int) -> tuple[int, str]:
        return min_calls(self.candidates, steps), f"best-of-{self.candidates} at sampling.steps={steps}"
