"""The settings of embedding arithmetic (techniques/embedding_arithmetic.py), declared once. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.base_spec import TechniqueSpec

MODES = ("pooled", "aligned")                       # embedding_arithmetic.EmbeddingArithmetic
WORLD_DIRECTIONS = ("size->large", "colour->red")   # embedding_arithmetic.world_contexts


@register("technique", "embedding_arithmetic")
@dataclass
class EmbeddingArithmeticSpec(TechniqueSpec):
    scalable = True                 # strength is alpha (the magnitude evaluator)
    _target_: str = "steerexp.techniques.embedding_arithmetic.EmbeddingArithmetic"
    world_direction: Optional[str] = "size->large"  # size->large | colour->red (used when the contexts are null)
    base_contexts: Any = None       # paired contexts (lists of prompts, one to one): alpha * mean(E(target) - E(base))
    target_contexts: Any = None
    alpha: float = 1.0
    mode: str = "pooled"            # pooled: one [D] vector on every token | aligned: per-token [L, D]
    gate: Optional[float] = None    # cosine threshold vs the contexts, in [-1, 1]; null = always apply
    slot_word: str = "object"       # fills '{}' in evaluation prompt templates

    def check(self, key: str) -> None:
        self.one_of(key, "mode", MODES)
        self.word(key, "slot_word", "object")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"{key}.alpha", f"must be a finite number, got {self.alpha!r}",
                              f"set e.g. {key}.alpha=1.0")
        if self.gate is not None and not -1 <= self.gate <= 1:
            raise ConfigError(f"{key}.gate", f"is a cosine similarity threshold in [-1, 1] (or null), got "
                              f"{self.gate!r}", f"set e.g. {key}.gate=0.8, or null to always apply the edit")
        base, target = self.base_contexts, self.target_contexts
        if (base is None) != (target is None):
            given, other = ("base_contexts", "target_contexts") if target is None else ("target_contexts",
                                                                                        "base_contexts")
            raise ConfigError(f"{key}.{other}", f"is null but {key}.{given} is set: the contexts are paired one to one",
                              f"give both {key}.base_contexts and {key}.target_contexts, or neither")
        if base is None:
            self.one_of(key, "world_direction", WORLD_DIRECTIONS)
            return
        self.strings(key, "base_contexts", "prompts", "['a small circle']")
        self.strings(key, "target_contexts", "prompts", "['a large circle']")
        if len(base) != len(target):
            raise ConfigError(f"{key}.target_contexts", f"holds {len(target)} contexts but {key}.base_contexts holds "
                              f"{len(base)}: they are paired one to one", "give as many target contexts as base ones")
