"""The spec every objective term's spec starts from (steerexp/spec.py). Torch-free.

Every config in conf/objective/ is a one-term `Composite` (objectives/composite.py); its term node,
`objective.terms.<name>`, extends the term's spec (`defaults: [<name>_spec@terms.<name>, _self_]`), so each term
declares its settings once, with its rules. Rules across terms (attribute_keep must not keep the head
concept_score moves) are `check_objective(key, terms, facts)`, given every term of the run's objective by name.
"""
from __future__ import annotations

from dataclasses import dataclass

from steerexp.spec import Facts, Spec, register_node


def _auto_node():
    """conf/objective/auto.yaml extends `schema/objective/auto`: {auto: true, terms: {}} with `terms` open (not in
    Hydra's struct mode), so `objective.terms.<term>.<setting>=...` needs no `+` before the technique's terms exist
    (steerexp/combine.py composes them, then merges these settings into the typed term nodes)."""
    from omegaconf import OmegaConf

    node = OmegaConf.create({"auto": True, "terms": {}})
    OmegaConf.set_struct(node.terms, False)
    return node


register_node("objective", "auto", _auto_node)


@dataclass
class TermSpec(Spec):
    """One weighted loss term: loss = weight * term(inputs)."""

    weight: float = 1.0

    def check(self, key: str) -> None:
        self.at_least(key, "weight", 0, 1.0)

    def check_objective(self, key: str, terms: dict[str, Spec | None], facts: Facts) -> None:
        """Rules across the objective's terms: `terms` maps each term's name to its spec (None: a term without)."""
