"""The settings of the edit benchmark (evaluators/edit_bench.py), declared once. Torch-free."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.evaluators.base_spec import EvaluatorSpec, edit_method, needs
from steerexp.spec import Facts, register

TYPES = ("colour", "shape", "size", "background", "position")   # the edits of every source scene (edit_bench.TYPES)


def _fields(template: str) -> list[str] | None:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


@register("evaluator", "edit_bench")
@dataclass
class EditBenchSpec(EvaluatorSpec):
    _target_: str = "steerexp.evaluators.edit_bench.EditBench"
    methods: Any = None     # <inversion>[+p2p[+blend]] or sdedit_s<strength>; null: every inversion method
    types: Any = field(default_factory=lambda: list(TYPES))   # the edits of every source scene (world mode)
    prompt_template: str = "a {size} {colour} {shape} {position} on a {background} background"  # target prompts
    seed: int = 0           # draws each edit's new value (per scene and type)
    judge: Optional[str] = None  # who reads the attributes, a scorer by name; null: analytic on the shapes world
    dilate: int = 1         # pixels added around the union of the object masks before measuring the background
    fg_tolerance: float = 0.15  # an edit's object mask: pixels this far (RGB, 0-1) from its median border colour
    grid_rows: int = 8
    attention_maps: Any = None  # a +p2p method (or true: the first one) whose cross-attention maps are drawn per token

    def applies(self, technique) -> str | None:
        return needs("invertible", "an inversion technique", technique)

    def check(self, key: str) -> None:
        types = self.types
        if types is not None:
            bad = [t for t in types if t not in TYPES] if isinstance(types, list) else [types]
            if bad or not types:
                raise ConfigError(f"{key}.types", f"must be a non-empty list of edit types, got {types!r}",
                                  f"choose from {list(TYPES)}, e.g. {key}.types=[colour,shape]")
            fields = _fields(self.prompt_template)
            missing = [t for t in types if t not in (fields or [])]
            if missing:
                raise ConfigError(f"{key}.prompt_template", f"{_short(self.prompt_template)} has no {{{missing[0]}}}, "
                                  f"so a {missing[0]} edit would not change the prompt",
                                  f"add {{{missing[0]}}} to it (and to technique.targets.prompt_template), "
                                  "or drop the type")
        self.methods_list(key, "methods", "[ddim_w7.5,di+p2p]")
        att = self.attention_maps
        if att is not None and not isinstance(att, bool) and not (edit_method(att) and "+p2p" in str(att)):
            raise ConfigError(f"{key}.attention_maps", f"must be a +p2p method (or true: the first one), got {att!r}",
                              f"set e.g. {key}.attention_maps=di+p2p, or null")
        self.at_least(key, "dilate", 0, 1)
        self.fraction(key, "fg_tolerance", 0.15)
        self.at_least(key, "grid_rows", 1, 8)

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        self.p2p_family(key, facts)
