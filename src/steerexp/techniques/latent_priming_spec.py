"""The settings of initial-latent priming (techniques/latent_priming.py), declared once. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
from steerexp.techniques.base_spec import TechniqueSpec

COMBINES = ("mean", "slerp")    # latent_priming.LatentPriming
# scorer kinds that cannot rank decoded images by P(head = target): CLIP has no heads, the noisy classifier reads
# noisy latents
NOT_RANKING = {"clip": "clip reads text similarity, not heads", "noisy": "it reads noisy latents, not images"}


@register("technique", "latent_priming")
@dataclass
class LatentPrimingSpec(TechniqueSpec):
    scalable = True                 # strength is the mixing weight (the magnitude evaluator)
    _target_: str = "steerexp.techniques.latent_priming.LatentPriming"
    prompts: Any = None             # ranking prompts; null: a few world prompts that do not name the size
    head: str = "size"              # the classifier head that ranks the candidates
    target: str = "large"           # the class of that head they should show
    candidates: int = 64            # N candidate x_T sampled and scored
    top_k: int = 8                  # the best k are combined
    combine: str = "mean"           # mean (renormalised to the Gaussian shell) | slerp
    mix: float = 0.8                # z_T = mix * primed + sqrt(1 - mix^2) * noise(seed), in [0, 1]
    slot_word: str = "object"       # fills '{}' in eval prompt templates
    scorer: str = "classifier"      # the classifier that ranks the candidates (conf/config.yaml: scorers), e.g. robust

    def check(self, key: str) -> None:
        self.at_least(key, "candidates", 1, 64)
        self.at_least(key, "top_k", 1, 8)
        if self.top_k > self.candidates:
            raise ConfigError(f"{key}.top_k", f"is {self.top_k}, more than the {self.candidates} candidates",
                              f"set {key}.top_k to at most {key}.candidates ({self.candidates})")
        self.one_of(key, "combine", COMBINES)
        self.fraction(key, "mix", 0.8)
        for name, example in (("head", "size"), ("target", "large"), ("slot_word", "object"),
                              ("scorer", "classifier")):
            self.word(key, name, example)
        self.strings(key, "prompts", "ranking prompts", "['a red circle']")

    def check_generator(self, key: str, facts: Facts) -> None:
        """The scorer is one of the run's that reads P(head = target) off images; a shipped classifier has the head."""
        table, k = facts.scorers, f"{key}.scorer"
        if self.scorer not in table:
            raise ConfigError(k, f"names no scorer of the run: {self.scorer!r}", "choose e.g. classifier or robust")
        kind = scorer_kinds.kind(self.scorer, table[self.scorer])
        if kind in NOT_RANKING:
            raise ConfigError(k, f"scorers.{self.scorer} cannot rank the candidates ({NOT_RANKING[kind]})",
                              "choose a classifier, e.g. classifier or robust")
        if kind == "user" and not scorer_kinds.has_path(table[self.scorer]):
            raise ConfigError(k, f"names scorers.{self.scorer}, which has no path",
                              f"set scorers.{self.scorer}.path (and .classes), or choose e.g. classifier")
        scorer_kinds.check_head(key, self.head, self.target, self.scorer, table)
