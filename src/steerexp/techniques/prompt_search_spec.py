"""The settings of black-box prompt search (techniques/prompt_search.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
from steerexp.techniques.base_spec import TechniqueSpec

SCORERS = ("concept", "clip")   # prompt_search.PromptSearch: the run's classifier (P(target)) or its CLIP


@register("technique", "prompt_search")
@dataclass
class PromptSearchSpec(TechniqueSpec):
    _target_: str = "steerexp.techniques.prompt_search.PromptSearch"
    prompt: str = "a photo of a object"     # the hand-written prompt to improve (eval.prompts should contain it)
    vocabulary: Any = None                  # null: the world's words; or a list of words
    scorer: str = "concept"                 # concept (classifier P(target)) | clip (similarity to clip_text)
    head: str = "shape"
    target: str = "star"
    clip_text: Optional[str] = None         # scorer=clip: the text (null: 'a photo of a <target>')
    beam_width: int = 4
    proposals: int = 12                     # neighbours proposed per beam member per round
    max_calls: int = 120                    # scorer calls (one call = one prompt scored on `seeds`)
    seeds: Any = field(default_factory=lambda: [100, 101, 102, 103])   # search seeds, disjoint from eval.seeds
    max_words: int = 12                     # insertions stop at this many words
    seed: Any = "${seed}"

    def check(self, key: str) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConfigError(f"{key}.prompt", f"is empty: give the prompt to improve, got {self.prompt!r}",
                              f"set e.g. {key}.prompt='a photo of a object'")
        self.one_of(key, "scorer", SCORERS)
        self.word(key, "head", "shape")
        self.word(key, "target", "star")
        for name, example in (("beam_width", 4), ("proposals", 12), ("max_calls", 120), ("max_words", 12)):
            self.at_least(key, name, 1, example)
        self.strings(key, "vocabulary", "words (null: the world's words)", "[red,large,star]")
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ConfigError(f"{key}.seeds", f"must be a non-empty list of search seeds, got {self.seeds!r}",
                              f"set e.g. {key}.seeds=[100,101,102,103]")

    def check_generator(self, key: str, facts: Facts) -> None:
        if self.scorer == "concept":   # the run's classifier (scorers.classifier) reads P(head = target)
            scorer_kinds.check_head(key, self.head, self.target, "classifier", facts.scorers)
