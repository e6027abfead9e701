"""The settings reno and noise_search share (techniques/noise.py), and their rules: the rewards name scorers of the
run, and `max_calls` pays for at least one step of the method. Torch-free. (Not registered: reno_spec.py and
noise_search_spec.py extend it.)"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

from steerexp import scorer_kinds
from steerexp.errors import ConfigError
from steerexp.spec import Facts
from steerexp.techniques.base_spec import TechniqueSpec


@dataclass
class NoiseSpec(TechniqueSpec):
    """Per-output noise optimisation against rewards; a record per (prompt, seed), no target images."""

    # the reward needs gradients (reno) or only values (noise_search)
    reward_gradients: ClassVar[bool] = False

    # the verifier: scorer name (conf/config.yaml: scorers) -> weight; 0 leaves it out; others:
    # +technique.rewards.<name>=w
    rewards: Dict[str, Any] = field(default_factory=lambda: {"classifier": 1.0, "robust": 0.0, "clip": 0.0})
    head: str = "${concept.head}"     # a classifier's term is log p(head = target); a CLIP's is similarity to the
    target: str = "${concept.target}"  # prompt
    max_calls: int = 160            # generator calls per output (one call = one denoiser step of one image)
    # optimised up front, in compute() (the run's step "learn or compute the deltas", before any evaluator runs):
    # these prompts x seeds, the evaluation's by default; their noises become deltas.safetensors. An output outside
    # them (the leakage suite's prompts, say) is optimised when an evaluator first asks for it: per-output
    # optimisation has no other way to edit an output it has not seen. null: nothing up front.
    prompts: Any = "${eval.prompts}"
    seeds: Any = "${eval.seeds}"
    batch: int = 16                 # outputs optimised together (each has its own noise and budget)
    slot_word: str = "object"

    def check(self, key: str) -> None:
        rewards, k = self.rewards, f"{key}.rewards"
        if not isinstance(rewards, dict) or not rewards:
            raise ConfigError(k, f"must map scorer names to weights, got {rewards!r}",
                              f"set e.g. {k}={{classifier:1.0}}")
        for name, w in rewards.items():
            if not _number(w) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"{k}.{name}", f"must be a finite weight >= 0, got {w!r}",
                                  f"set e.g. {k}.{name}=1.0 (0 leaves it out)")
        if not any(w > 0 for w in rewards.values()):
            raise ConfigError(k, "has no positive weight: nothing to optimise", f"set e.g. {k}.classifier=1.0")
        self.at_least(key, "max_calls", 1, 160)
        self.at_least(key, "batch", 1, 16)
        self.word(key, "slot_word", "object")

    def calls_needed(self, steps: int) -> tuple[int, str]:
        """The generator calls per output one step of the method takes at sampling.steps=`steps`, and what for."""
        raise NotImplementedError

    def check_generator(self, key: str, facts: Facts) -> None:
        """The rewards name scorers of the run that read images (and give gradients, for reno); max_calls pays for
        one step of the method at the run's sampling.steps."""
        table = scorer_kinds.table(facts.scorers)
        for name, w in self.rewards.items():
            if w == 0:
                continue
            k = f"{key}.rewards.{name}"
            if name not in table:
                raise ConfigError(k, f"names no scorer of the run: {name!r}", f"choose from {sorted(table)}")
            kind = scorer_kinds.kind(name, table[name])
            if kind == "noisy" or (self.reward_gradients and kind == "analytic"):
                why = "reads noisy latents, not images" if kind == "noisy" else "has no gradients to follow"
                raise ConfigError(k, f"scorers.{name} {why}", "use a classifier (classifier, robust) or clip"
                                  + ("; or technique=noise_search, which needs no gradient" if kind == "analytic"
                                     else ""))
        steps = facts.sampling_steps
        if isinstance(steps, int) and steps >= 1:
            need, what = self.calls_needed(steps)
            if self.max_calls < need:
                raise ConfigError(f"{key}.max_calls", f"is {self.max_calls} generator calls per output, but {what} "
                                  f"needs {need}", f"set {key}.max_calls={need} or more")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
