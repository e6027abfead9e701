"""The spec every evaluator's spec starts from (steerexp/spec.py): what an evaluator asks of the technique, and
the rules its shared settings follow. Torch-free.

An evaluator says from the technique's capabilities (the class attributes of its spec:
techniques/base_spec.py) whether it applies, `applies(technique) -> None | why not`, and decides the settings it
leaves to the technique (`auto` values), `adapt(technique) -> {setting: value}`. steerexp/combine.py reads both
before validation: with the default evaluator list one that cannot apply is skipped with a line saying why; one the
run names itself is refused in one line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.spec import Facts, Spec

if TYPE_CHECKING:
    from steerexp.techniques.base_spec import TechniqueSpec

# an edit method: <inversion>[+p2p[+blend]] or sdedit_s<strength in (0, 1]> (techniques/ddim_inversion.py), or a
# flow editor without attention control: flowedit (technique=flow_edit), rfinv (technique=rf_inversion), rfsolver
# (technique=rf_solver)
EDIT_METHOD = re.compile(r"(vae|npi|nti|di|ddim_w\d+(\.\d+)?)(\+p2p(\+blend)?)?|sdedit_s(0?\.\d+|1(\.0*)?)"
                         r"|flowedit|rfinv|rfsolver")
EDIT_METHOD_FIX = ("use <inversion>[+p2p[+blend]] (inversion: ddim_w<w>, npi, nti, di), sdedit_s<strength in "
                   "(0, 1]>, flowedit, rfinv or rfsolver, e.g. nti+p2p+blend")


def edit_method(m: Any) -> bool:
    """An edit method name: <inversion>[+p2p[+blend]] or sdedit_s<strength> (evaluators edit, edit_bench)."""
    return isinstance(m, str) and EDIT_METHOD.fullmatch(m) is not None


@dataclass
class EvaluatorSpec(Spec):
    """An evaluator. A setting `judge` (a scorer of the run by name, null: the default judge) is checked here."""

    def applies(self, technique: TechniqueSpec | None) -> str | None:
        """None when this evaluator can evaluate the technique (its spec, None: a technique without one, which is
        given the benefit of the doubt), else why not, one clause naming what it needs."""
        return None

    def adapt(self, technique: TechniqueSpec | None) -> tuple[dict[str, Any], str | None]:
        """The settings this evaluator leaves to the technique (`auto`), decided for it: ({setting: value}, a line
        for the user when it chose an alternative, else None)."""
        return {}, None

    def refusal(self, key: str, technique: TechniqueSpec, others: list[str]) -> ConfigError:
        """The error for a run that names this evaluator for a technique it cannot apply to."""
        return ConfigError(key, f"cannot evaluate this run: it {self.applies(technique)}",
                           f"drop it: evaluator=[{','.join(others)}], or choose a technique it applies to")

    def check_generator(self, key: str, facts: Facts) -> None:
        judge = getattr(self, "judge", None)
        if judge is not None:
            scorer_kinds.check_judge(f"{key}.judge", judge, facts.scorers)

    # ------------------------------------------------------------------ shared rules
    def methods_list(self, key: str, name: str, example: str, inversion_only: bool = False) -> None:
        """`name` is null or a non-empty list of edit methods."""
        methods = getattr(self, name)
        if methods is None:
            return
        if not isinstance(methods, list) or not methods:
            raise ConfigError(f"{key}.{name}", f"must be a non-empty list of edit methods, got {methods!r}",
                              f"set e.g. {key}.{name}={example} (null: every inversion method)")
        for i, m in enumerate(methods):
            if not edit_method(m) or inversion_only and "+" in m:
                raise ConfigError(f"{key}.{name}[{i}]", f"{m!r} is not an {'inversion' if inversion_only else 'edit'}"
                                  " method", "use vae, ddim_w<w>, npi, nti or di" if inversion_only else
                                  EDIT_METHOD_FIX)

    def p2p_family(self, key: str, facts: Facts) -> None:
        """+p2p methods (Prompt-to-Prompt) need a family with cross-attention maps (generators.check_edit_methods)."""
        if facts.family is not None:
            from steerexp.generators import check_edit_methods  # (torch-free)

            node = {"methods": getattr(self, "methods", None), "attention_maps": getattr(self, "attention_maps", None)}
            check_edit_methods({key.split(".", 1)[1]: node}, facts.family)


def needs(capability: str, what: str, technique: TechniqueSpec | None) -> str | None:
    """The usual `applies`: the technique's spec has the capability (a TechniqueSpec class attribute), or why not,
    naming the registered techniques that have it."""
    if technique is None or getattr(technique, capability, False):
        return None
    from steerexp import spec

    having = sorted(name for name, cls in spec.registered("technique").items() if getattr(cls, capability, False))
    return f"needs {what} ({', '.join(having)}); technique {technique.label or type(technique).__name__} is not one"
