"""The settings of embedding nudging (techniques/nudging.py), declared once. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.objectives.concept_score_spec import check_keep
from steerexp.spec import Facts, register
from steerexp.techniques.base_spec import TechniqueSpec

MODES = ("nudge", "noise", "wen")
LATENTS = ("z_T", "prompt")
PREFERRED = ("prompt", "exemplars", "both")
UNDESIRED = ("all", "nearest")
# filter kind -> its settings (nudging.FILTERS builds them)
FILTER_SETTINGS = {"memorisation": ("threshold",), "clip": ("tau",), "classifier": ("head", "classes", "threshold")}
KEEP_KEYS = ("heads", "weight", "scorer")


@register("technique", "nudging")
@dataclass
class NudgingSpec(TechniqueSpec):
    """Embedding nudging (arXiv 2408.15450): filter each output; when triggered, optimise its latent (CLIP pull toward
    the prompt, push from the protected set) and regenerate, in adaptive rounds. No target images: it steers away
    from the protected set."""

    filtered = True     # filters and nudges each output (techniques/protocols.py: Filtered)

    _target_: str = "steerexp.techniques.nudging.Nudging"
    mode: str = "nudge"             # nudge | noise (Somepalli et al. baseline) | wen (Wen et al. baseline)
    latent: str = "z_T"             # what nudge optimises: z_T (the initial noise) | prompt (the prompt embedding)
    # any that triggers counts; kinds: memorisation {threshold}, clip {tau}, classifier {head, classes, threshold}
    filters: Any = field(default_factory=lambda: [{"kind": "memorisation", "threshold": 0.1}])
    alpha: float = 1.0              # pull: -alpha * mean cos(E(x), preferred)
    beta: float = 1.0               # push: +beta * mean cos(E(x), undesired), raised while still triggered
    gamma: float = 0.01             # stay close: +gamma * ||L - L0||
    preferred: str = "prompt"       # prompt (CLIP text of the prompt) | exemplars | both
    exemplars: Optional[str] = None     # folder of exemplar images (preferred: exemplars | both)
    undesired: str = "all"          # all protected embeddings | nearest (the one nearest the initial output)
    protected: Optional[str] = None     # null: the world's protected set; or a folder of images
    rounds: int = 3                 # adaptive rounds (re-filter after each)
    beta_growth: float = 2.0        # beta *= beta_growth while still triggered
    opt_steps: int = 8              # Adam steps per round
    opt_lr: float = 0.1
    opt_sampling_steps: Optional[int] = 10  # DDIM steps of the differentiable sampling (outputs always use
                                            # sampling.steps; null: sampling.steps)
    noise_lambda: float = 0.1       # mode=noise: c + lambda * N(0, I)
    prompts: Any = None             # pre-run these x `seeds` in compute(): their records become deltas.safetensors
    seeds: Any = None
    slot_word: str = "object"
    nudge_batch: int = 16
    # e.g. {heads: [colour, shape], weight: 1.0, scorer: robust}: + weight * KL from the initial output's classifier
    # reading to the nudged one's (keep its content, change its layout): an attribute_keep term
    # (objectives/concept_score.py) on the initial output, under that term's rules
    keep: Any = None

    def check(self, key: str) -> None:
        for name, options in (("mode", MODES), ("latent", LATENTS), ("preferred", PREFERRED),
                              ("undesired", UNDESIRED)):
            self.one_of(key, name, options)
        for name in ("alpha", "beta", "gamma", "noise_lambda"):
            self.at_least(key, name, 0, 1.0)
        if self.mode == "nudge" and self.alpha == 0 and self.beta == 0:
            raise ConfigError(f"{key}.beta", "and technique.alpha are both 0: the nudging objective has nothing to "
                              "pull toward or push from", f"set {key}.beta > 0, e.g. {key}.beta=1.0")
        self.at_least(key, "rounds", 1, 3)
        self.at_least(key, "opt_steps", 1, 8)
        self.at_least(key, "beta_growth", 1, "2.0 (beta rises while triggered)")
        self.positive(key, "opt_lr", 0.1)
        self.at_least(key, "opt_sampling_steps", 1, 10, optional=True)
        self.at_least(key, "nudge_batch", 1, 16)
        self.word(key, "slot_word", "object")
        if self.preferred != "prompt" and not self.exemplars:
            raise ConfigError(f"{key}.exemplars", f"is not set, but technique.preferred={self.preferred} pulls toward "
                              "exemplar images", f"set {key}.exemplars=<folder of images>, or {key}.preferred=prompt")
        self.check_filters(key)
        self.check_keep(key)

    def check_filters(self, key: str) -> None:
        k = f"{key}.filters"
        if not isinstance(self.filters, list) or not self.filters:
            raise ConfigError(k, f"must be a non-empty list of filters (nothing would ever trigger), got "
                              f"{self.filters!r}", f"set e.g. '{k}=[{{kind:memorisation,threshold:0.1}}]'")
        for i, f in enumerate(self.filters):
            kind = f.get("kind") if isinstance(f, dict) else None
            if kind not in FILTER_SETTINGS:
                raise ConfigError(f"{k}[{i}]", f"must be a filter {{kind: ...}} of a kind in "
                                  f"{', '.join(FILTER_SETTINGS)}, got {f!r}", f"set e.g. {k}[{i}]="
                                  "{kind:memorisation,threshold:0.1}")
            unknown = sorted(set(f) - {"kind", *FILTER_SETTINGS[kind]})
            if unknown:
                raise ConfigError(f"{k}[{i}].{unknown[0]}", f"is not a setting of a {kind} filter",
                                  f"its settings are {', '.join(FILTER_SETTINGS[kind])}")
            v = f.get("threshold")
            if v is not None and not (_number(v) and (v > 0 if kind == "memorisation" else 0 <= v <= 1)):
                raise ConfigError(f"{k}[{i}].threshold", f"must be {'> 0' if kind == 'memorisation' else 'in [0, 1]'}, "
                                  f"got {v!r}", f"set e.g. {k}[{i}].threshold={0.1 if kind == 'memorisation' else 0.5}")
            if kind == "clip" and f.get("tau") is not None and not (_number(f["tau"]) and -1 <= f["tau"] <= 1):
                raise ConfigError(f"{k}[{i}].tau", f"must be a cosine in [-1, 1], got {f['tau']!r}",
                                  f"set e.g. {k}[{i}].tau=0.9")
            if kind == "classifier" and not (isinstance(f.get("classes"), list) and f["classes"]):
                raise ConfigError(f"{k}[{i}].classes", f"must list the classes that trigger, got {f.get('classes')!r}",
                                  f"set e.g. {k}[{i}]={{kind:classifier,head:colour,classes:[red]}}")

    def check_keep(self, key: str) -> None:
        keep, base = self.keep, f"{key}.keep"
        if keep is None:
            return
        if not isinstance(keep, dict) or set(keep) - set(KEEP_KEYS):
            raise ConfigError(base, f"must be null or {{heads, weight, scorer}}, got {keep!r}",
                              f"set e.g. '{base}={{heads:[colour,shape],weight:1.0,scorer:robust}}'")
        if self.mode != "nudge":
            raise ConfigError(base, f"holds the nudge's objective; mode={self.mode} has none",
                              f"set {base}=null or technique.mode=nudge")
        weight = keep.get("weight", 1.0)
        if not _number(weight) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(base + ".weight", f"must be a number >= 0, got {weight!r}", f"set e.g. {base}.weight=1.0")

    def check_generator(self, key: str, facts: Facts) -> None:
        """The keep term: an image classifier of the run with the heads it keeps (attribute_keep's rules)."""
        if not isinstance(self.keep, dict):
            return
        base, scorer = f"{key}.keep", self.keep.get("scorer", "classifier")
        scorer_kinds.check_optimisable(f"{base}.scorer", scorer, facts.scorers)
        check_keep(base, self.keep.get("heads"), scorer, facts.scorers)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
