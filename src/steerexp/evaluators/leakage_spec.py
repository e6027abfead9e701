"""The settings of the leakage evaluator (evaluators/leakage.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec
from steerexp.spec import register


@register("evaluator", "leakage")
@dataclass
class LeakageSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.leakage.Leakage"
    prompts: Any = None         # null: the world's unrelated suite; or a list, or a text file (one per line)
    tolerance: float = 0.1      # pass when the attribute flip rate is at most this
    heads: Any = None           # attributes whose flips count; null: all (shape, colour, size, position)
    judge: Optional[str] = None  # who reads the attributes, a scorer by name; null: analytic on the shapes world
    head: Any = "${concept.head}"       # the run's concept: how much its score changes on unrelated prompts
    target: Any = "${concept.target}"

    def check(self, key: str) -> None:
        self.fraction(key, "tolerance", 0.1)
        self.strings(key, "heads", "heads", "[shape,colour]")
        p = self.prompts
        if isinstance(p, list) and not p:
            raise ConfigError(f"{key}.prompts", "is empty", f"give prompts, or {key}.prompts=null for the world's "
                              "unrelated suite")
