"""The settings of concept_score and attribute_keep (objectives/concept_score.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.objectives.base_spec import TermSpec
from steerexp.spec import Facts, register

REFERENCES = ("start", "prompt")   # attribute_keep.reference


@register("objective", "concept_score")
@dataclass
class ConceptScoreSpec(TermSpec):
    _target_: str = "steerexp.objectives.concept_score.ConceptScore"
    weight: float = 1.0
    head: Any = "${concept.head}"   # the run's concept (top-level `concept:` in conf/config.yaml)
    target: Any = "${concept.target}"
    # the classifier optimised, a scorer of the run by name (classifier, robust, ...): the run records it, and
    # evaluators judging with it report an independent judge
    scorer: str = "classifier"

    def check(self, key: str) -> None:
        super().check(key)
        self.word(key, "head", "colour")
        self.word(key, "target", "red")

    def check_generator(self, key: str, facts: Facts) -> None:
        scorer_kinds.check_optimisable(f"{key}.scorer", self.scorer, facts.scorers)
        heads = scorer_kinds.shipped_heads(self.scorer, facts.scorers)
        if heads is None:
            return
        if self.head not in heads:
            raise ConfigError(f"{key}.head", f"is {self.head!r}, which scorers.{self.scorer} has no head for",
                              f"choose among {sorted(heads)} (concept.head sets it for the whole run)")
        if self.target not in heads[self.head]:
            raise ConfigError(f"{key}.target", f"is {self.target!r}, which is no {self.head} of scorers.{self.scorer}",
                              f"choose one of {list(heads[self.head])} (concept.target sets it for the whole run)")


def check_keep(base: str, heads: Any, scorer: Any, scorers: dict | None, reference: Any = "start",
               moved: str | None = None) -> None:
    """The rules of an attribute_keep term at `base` (objective.terms.attribute_keep, or nudging's technique.keep):
    heads of an image classifier with named heads, none of them the head `moved` that another term moves."""
    key = f"{base}.heads"
    if not isinstance(heads, list) or not heads or not all(isinstance(h, str) for h in heads):
        raise ConfigError(key, f"must list the classifier heads to keep, got {heads!r}",
                          f"set e.g. {key}=[shape,colour]")
    if reference not in REFERENCES:
        raise ConfigError(f"{base}.reference", f"must be start or prompt, got {reference!r}", "start keeps the "
                          "zero-delta image's reading, prompt the class the prompt names")
    if moved in heads:
        rest = [h for h in heads if h != moved]
        raise ConfigError(key, f"includes {moved!r}, the head concept_score moves: the two terms would pull "
                          "against each other", f"keep the other heads: {key}=[{','.join(rest) or 'shape'}]")
    tab = scorer_kinds.table(scorers)
    if isinstance(scorer, str) and scorer_kinds.kind(scorer, tab.get(scorer)) == "user":
        raise ConfigError(f"{base}.scorer", "is the user's one-head model, which answers every head name with the same "
                          "output", "keep heads with a classifier that has named heads, e.g. robust")
    shipped = scorer_kinds.shipped_heads(scorer, scorers) if isinstance(scorer, str) else None
    if shipped is not None:
        unknown = [h for h in heads if h not in shipped]
        if unknown:
            raise ConfigError(key, f"names {unknown}, which scorers.{scorer} has no head for",
                              f"choose among {sorted(shipped)}")


@register("objective", "attribute_keep")
@dataclass
class AttributeKeepSpec(TermSpec):
    _target_: str = "steerexp.objectives.concept_score.AttributeKeep"
    weight: float = 1.0
    heads: Any = field(default_factory=lambda: ["shape", "colour"])
    scorer: str = "classifier"      # a scorer of the run by name; the run records it as optimised against
    reference: str = "start"        # start: where the zero-delta image had it; prompt: the class the prompt names

    def check(self, key: str) -> None:
        super().check(key)
        self.one_of(key, "reference", REFERENCES)

    def check_generator(self, key: str, facts: Facts) -> None:
        scorer_kinds.check_optimisable(f"{key}.scorer", self.scorer, facts.scorers)

    def check_objective(self, key: str, terms: dict, facts: Facts) -> None:
        moved = getattr(terms.get("concept_score"), "head", None)
        check_keep(key, self.heads, self.scorer, facts.scorers, self.reference, moved)
