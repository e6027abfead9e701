"""The settings of the memorisation evaluator (evaluators/memorisation.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec
from steerexp.spec import register

REFERENCES = ("auto", "targets", "protected")


@register("evaluator", "memorisation")
@dataclass
class MemorisationSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.memorisation.Memorisation"
    # targets: overfit to the technique's own images | protected: the world's protected set | auto: targets when the
    # technique has target images (textual inversion, the inversions), else protected
    reference: str = "auto"
    threshold: float = 0.1      # per-pixel RMS under which an edited sample counts as a copy of its nearest reference
    prompts: Any = None         # null: the eval prompts (protected: the world's protected captions)

    def applies(self, technique) -> str | None:
        if self.reference == "targets" and technique is not None and not technique.has_targets:
            return f"compares with the technique's target images (reference=targets), and {technique.label} has none"
        return None

    def adapt(self, technique) -> tuple[dict[str, Any], str | None]:
        if self.reference != "auto" or technique is None:
            return {}, None   # (a technique without a spec: the evaluator decides at run time)
        if technique.has_targets:
            return {"reference": "targets"}, None
        return {"reference": "protected"}, (f"technique {technique.label} has no target images: memorisation is "
                                            "measured against the world's protected set (reference=protected)")

    def refusal(self, key: str, technique, others: list[str]) -> ConfigError:
        return ConfigError(f"{key}.reference", f"is targets, but technique {technique.label} has no target images to "
                           "compare with", f"set {key}.reference=protected (the world's protected set) or auto "
                           "(targets when the technique has them)")

    def check(self, key: str) -> None:
        self.one_of(key, "reference", REFERENCES)
        self.positive(key, "threshold", 0.1)
        p = self.prompts
        if p is not None and (not isinstance(p, list) or not p or not all(isinstance(x, str) for x in p)):
            raise ConfigError(f"{key}.prompts", f"must be null or a non-empty list of prompts, got {p!r}",
                              f"set e.g. {key}.prompts=['a photo of a {{}}'], or null")
