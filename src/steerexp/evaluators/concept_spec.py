"""The settings of the concept evaluator (evaluators/concept.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec
from steerexp.spec import register


@register("evaluator", "concept")
@dataclass
class ConceptSpec(EvaluatorSpec):
    renamed = {"scorer": "judge"}

    _target_: str = "steerexp.evaluators.concept.Concept"
    head: Any = "${concept.head}"       # the run's concept (conf/config.yaml: concept)
    target: Any = "${concept.target}"
    threshold: float = 0.5
    # who judges, a scorer by name (conf/config.yaml: scorers): analytic | classifier | clip | user | any named
    # scorer; null: analytic on the shapes world, else user when its path is set, else classifier. A judge the edit
    # was optimised against gets an independent one next to it (concept/independent/...)
    judge: Optional[str] = None
    success_rate: float = 0.8   # reward hacking: the objective's scorer reads the target on >= this share of edited
    min_gain: float = 0.25      # images and this much above baseline, while the independent judge does not (and reads
                                # it on at least this much fewer). 0.8: issue 15's bar for an edit that works

    def check(self, key: str) -> None:
        self.word(key, "head", "shape")
        self.word(key, "target", "star")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"{key}.threshold", f"must be in (0, 1), got {self.threshold!r}",
                              f"set e.g. {key}.threshold=0.5")
        for name, example in (("success_rate", 0.8), ("min_gain", 0.25)):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"{key}.{name}", f"must be in (0, 1], got {v!r}", f"set e.g. {key}.{name}={example}")
