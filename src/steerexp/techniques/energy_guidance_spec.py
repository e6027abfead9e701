"""The settings of energy (classifier / CLIP) guidance (techniques/energy_guidance.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
from steerexp.techniques.base_spec import TechniqueSpec

GUIDING_KINDS = ("classifier", "user", "noisy", "clip")   # scorer kinds with a gradient to guide with
NAMES = {"concept": "classifier"}                          # technique.scorer's old names


@register("technique", "energy_guidance")
@dataclass
class EnergyGuidanceSpec(TechniqueSpec):
    scalable = True                 # strength is the scale (the magnitude evaluator)
    _target_: str = "steerexp.techniques.energy_guidance.EnergyGuidance"
    # a scorer of the run by name (conf/config.yaml: scorers) whose kind gives a gradient: classifier | robust | noisy |
    # clip | a user's model
    scorer: str = "classifier"
    head: str = "size"
    target: str = "large"
    clip_text: Optional[str] = None  # a clip scorer: the text (null: 'a photo of a <target>')
    scale: float = 5.0
    start: float = 0.0              # apply within [start, end) of the sampling steps
    end: float = 0.8
    slot_word: str = "object"       # fills '{}' in eval prompt templates

    def check(self, key: str) -> None:
        self.word(key, "scorer", "classifier")
        self.word(key, "head", "size")
        self.word(key, "target", "large")
        self.word(key, "slot_word", "object")
        self.at_least(key, "scale", 0, 5.0)
        self.fraction(key, "start", 0.0)
        self.fraction(key, "end", 0.8)
        if not self.start < self.end:
            raise ConfigError(f"{key}.end", f"must be above {key}.start ({self.start}), got {self.end}",
                              f"set e.g. {key}.start=0.0 {key}.end=0.8")

    def check_generator(self, key: str, facts: Facts) -> None:
        """The scorer is one of the run's and gives a gradient to guide with; a shipped classifier has the head."""
        table, k = facts.scorers, f"{key}.scorer"
        name = NAMES.get(self.scorer, self.scorer)

        def usable(n: str, s) -> bool:
            return scorer_kinds.kind(n, s) in GUIDING_KINDS and (scorer_kinds.kind(n, s) != "user"
                                                                   or scorer_kinds.has_path(s))

        fix = f"set {k} to one of {sorted(n for n, s in table.items() if usable(n, s))}"
        if name not in table:
            raise ConfigError(k, f"no scorer named {name!r} in scorers (conf/config.yaml)", fix)
        kind = scorer_kinds.kind(name, table[name])
        if kind not in GUIDING_KINDS:
            raise ConfigError(k, f"scorers.{name} is of kind {kind!r}, which gives no gradient to guide with", fix)
        if kind == "user" and not scorer_kinds.has_path(table[name]):
            raise ConfigError(k, f"names scorers.{name}, which has no path",
                              f"set scorers.{name}.path (and .classes), or {fix}")
        if kind != "clip":
            scorer_kinds.check_head(key, self.head, self.target, name, table)

