"""The settings of the optimised input deltas (techniques/input_delta.py), declared once: one spec, three options
(prompt_delta: delta_text; latent_offset: delta_z; prompt_delta_latent_offset: both). Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from steerexp.errors import ConfigError
from steerexp.spec import Facts, closest, register
from steerexp.techniques.base_spec import TrainableSpec

LATENT_MODES = ("shared", "per_seed")     # input_delta.InputDelta
TEXT_NORMS = ("tensor", "token")          # budgets.DeltaBudget
BUDGET_KEYS = ("eps_text", "eps_z", "text_norm", "joint", "chi")   # budgets.DeltaBudget's fields


def _budget(eps_text: float | None, eps_z: float | None) -> dict:
    return {"eps_text": eps_text, "eps_z": eps_z, "text_norm": "tensor", "joint": False, "chi": 0.0}


@dataclass
class InputDeltaSpec(TrainableSpec):
    # the deltas are scored on decoded images (an image objective): the denoising loss needs target images, and
    # these techniques have none
    default_objective = ("concept_score", "delta_l2")
    refuses_objective = ("denoising",)
    scalable = True                 # strength scales both deltas (the magnitude evaluator)

    _target_: str = "steerexp.techniques.input_delta.InputDelta"
    text: bool = True               # learn delta_text, the prompt-embedding delta
    latent: bool = False            # learn delta_z, the initial-latent offset
    tokens: Any = "all"             # all | a word of the prompts (e.g. blue) | a list of token indices
    latent_mode: str = "shared"     # (latent offsets only) shared: one for every seed | per_seed: one per train seed
    prompts: Any = field(default_factory=lambda: ["a blue circle"])   # training prompts
    slot_word: str = "circle"       # fills '{}' in evaluation prompt templates
    train_seeds: Any = field(default_factory=lambda: [100, 101, 102, 103, 104, 105, 106, 107])
    train_sampling_steps: int = 10  # DDIM steps the gradient flows through (evaluation uses sampling.steps)
    checkpoint: bool = True         # recompute each DDIM step in the backward pass (memory ~ constant in the steps)
    # eps_text: ||delta_text|| <= eps_text after every step (null: no ball); eps_z: ||delta_z|| <= eps_z (per seed,
    # or the shared one; |z| is about 16); text_norm: tensor (one norm over all of delta_text) | token (a ball per
    # token); joint: one shared budget (||dt||/eps_text)^2 + (||dz||/eps_z)^2 <= 1; chi: + chi * chi-norm (Gaussian
    # shell) penalty on z + delta_z
    budget: Any = field(default_factory=lambda: _budget(4.0, None))
    lr: float = 0.05
    steps: int = 60
    batch_size: int = 4

    def check(self, key: str) -> None:
        super().check(key)
        if not (self.text or self.latent):
            raise ConfigError(f"{key}.text", f"and {key}.latent are both false: the technique has nothing to learn",
                              f"set {key}.text=true and/or {key}.latent=true")
        self.one_of(key, "latent_mode", LATENT_MODES)
        self.at_least(key, "train_sampling_steps", 1, 10)
        self.word(key, "slot_word", "circle")
        self._check_tokens(key)
        self.strings(key, "prompts", "training prompts", "['a blue circle']", optional=False)
        seeds = self.train_seeds
        if not isinstance(seeds, list) or not seeds:
            raise ConfigError(f"{key}.train_seeds", f"must be a non-empty list of seeds, got {seeds!r}",
                              f"set e.g. {key}.train_seeds=[100,101,102,103]")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if repeated:
            raise ConfigError(f"{key}.train_seeds", f"lists seed {repeated[0]!r} more than once",
                              "list each training seed once")
        self._check_budget(key)

    def _check_tokens(self, key: str) -> None:
        t = self.tokens
        if isinstance(t, str):
            if not t.strip() or any(ch.isspace() for ch in t.strip()):
                raise ConfigError(f"{key}.tokens", f"must be all, one word of the prompts or a list of token indices, "
                                  f"got {t!r}", f"set e.g. {key}.tokens=all or {key}.tokens=blue")
            return
        if isinstance(t, int) and not isinstance(t, bool):
            t = [t]
        if (not isinstance(t, list) or not t or not all(isinstance(i, int) and not isinstance(i, bool) for i in t)
                or any(i < 0 for i in t) or len(set(t)) != len(t)):
            raise ConfigError(f"{key}.tokens", f"must be all, one word of the prompts or a list of distinct token "
                              f"indices >= 0, got {self.tokens!r}", f"set e.g. {key}.tokens=[2,3]")

    def _check_budget(self, key: str) -> None:
        b, k = self.budget, f"{key}.budget"
        if b is None:
            return
        if not isinstance(b, dict):
            raise ConfigError(k, f"must be a mapping of {', '.join(BUDGET_KEYS)}, got {b!r}",
                              f"set e.g. {k}.eps_text=4.0")
        for name in b:
            if name == "l2":
                raise ConfigError(f"{k}.l2", "is not a budget: an L2 penalty is the delta_l2 objective term",
                                  f"drop {k}.l2 and add it to the objective: objective=[concept_score,delta_l2] "
                                  "objective.terms.delta_l2.weight=0.01")
            if name not in BUDGET_KEYS:
                near = closest(str(name), BUDGET_KEYS)
                raise ConfigError(f"{k}.{name}", "is not a setting of the input deltas' budget",
                                  f"did you mean {k}.{near}?" if near else f"its settings are {', '.join(BUDGET_KEYS)}")
        for name in ("eps_text", "eps_z"):
            v = b.get(name)
            if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{k}.{name}", f"must be a positive number (or null for no ball), got {v!r}",
                                  f"set e.g. {k}.{name}=2.0")
        chi = b.get("chi", 0.0)
        if not (_number(chi) and math.isfinite(chi) and chi >= 0):
            raise ConfigError(f"{k}.chi", f"must be a number >= 0, got {chi!r}", f"set {k}.chi=0 to disable it")
        norm = b.get("text_norm", "tensor")
        if norm not in TEXT_NORMS:
            raise ConfigError(f"{k}.text_norm", f"must be one of {', '.join(TEXT_NORMS)}, got {norm!r}",
                              f"set {k}.text_norm=tensor")
        joint = b.get("joint", False)
        if not isinstance(joint, bool):
            raise ConfigError(f"{k}.joint", f"must be true or false, got {joint!r}", f"set {k}.joint=false")
        if not joint:
            return
        missing = [n for n, on in (("eps_text", self.text), ("eps_z", self.latent)) if on and b.get(n) is None]
        if missing:
            raise ConfigError(f"{k}.{missing[0]}", "is null, but budget.joint shares one budget between delta_text "
                              "and delta_z, which needs the radius of each", f"set {k}.{missing[0]}=4.0 (the radius "
                              f"it would have alone), or {k}.joint=false")
        if self.latent and self.latent_mode == "per_seed":
            raise ConfigError(f"{k}.joint", "needs one norm per delta, but latent_mode=per_seed has one per seed",
                              f"set {key}.latent_mode=shared, or {k}.joint=false")
        if norm != "tensor":
            raise ConfigError(f"{k}.joint", f"needs one norm per delta, but text_norm={norm} has one per token",
                              f"set {k}.text_norm=tensor, or {k}.joint=false")

    def check_generator(self, key: str, facts: Facts) -> None:
        top = facts.num_train_timesteps
        v = self.train_sampling_steps
        if top is not None and isinstance(v, int) and v > top:
            where = "the scheduler's num_train_timesteps" if facts.folder is not None else \
                "the default num_train_timesteps"
            raise ConfigError(f"{key}.train_sampling_steps", f"is {v}, more than {where} ({top})",
                              f"set {key}.train_sampling_steps in 1..{top} (e.g. 25)")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@register("technique", "prompt_delta")
@dataclass
class PromptDeltaSpec(InputDeltaSpec):
    """delta_text alone."""


@register("technique", "latent_offset")
@dataclass
class LatentOffsetSpec(InputDeltaSpec):
    """delta_z alone."""

    text: bool = False
    latent: bool = True
    budget: Any = field(default_factory=lambda: _budget(None, 4.0))


@register("technique", "prompt_delta_latent_offset")
@dataclass
class PromptDeltaLatentOffsetSpec(InputDeltaSpec):
    """delta_text and delta_z."""

    text: bool = True
    latent: bool = True
    budget: Any = field(default_factory=lambda: _budget(4.0, 4.0))
