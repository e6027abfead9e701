"""The settings of ReNO (techniques/reno.py), declared once, and its call budget. Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.noise_spec import NoiseSpec

KEEP = ("best", "last")


def step_calls(k: int, checkpoint: bool) -> int:
    """Calls of one gradient step through k sampling steps: its forward, backward (2) and recomputation (checkpoint)."""
    return (3 + bool(checkpoint)) * k


def final_calls(k: int, steps: int) -> int:
    """The final sample at sampling.steps from the kept noise, when the optimisation sampled at other steps."""
    return 0 if k == steps else steps


def min_calls(k: int, steps: int, checkpoint: bool) -> int:
    """Calls per output of one gradient step: the first sample, the step, and the final sample."""
    return k + step_calls(k, checkpoint) + final_calls(k, steps)


@register("technique", "reno")
@dataclass
class ReNOSpec(NoiseSpec):
    """ReNO: a few gradient steps on each output's initial noise against rewards, with a chi-norm regulariser (code:
    steerexp/techniques/reno.py; rewards and call counting: steerexp/techniques/noise.py)."""

    reward_gradients = True

    _target_: str = "steerexp.techniques.reno.ReNO"
    max_calls: int = 160            # generator calls per output (one call = one denoiser step of one image;
                                    # backward = 2)
    lr: float = 1.0                 # SGD with Nesterov momentum on x_T
    momentum: float = 0.9
    grad_clip: Optional[float] = 1.0    # per-output gradient norm clip (null: none)
    norm_weight: float = 0.01       # weight of the chi-distribution NLL of ||x_T|| (keeps it on the Gaussian shell)
    iterations: Optional[int] = None    # at most this many gradient steps (null: as many as max_calls affords)
    # DDIM steps differentiated through (few, as ReNO's one-step models; null: sampling.steps); the output is then
    # sampled from the optimised x_T at sampling.steps
    opt_sampling_steps: Optional[int] = 5
    checkpoint: bool = False        # gradient checkpointing per step (saves memory, costs 1 more call per step)
    keep: str = "best"              # best: the iterate with the highest reward (the plain sample included) | last

    def check(self, key: str) -> None:
        super().check(key)
        self.positive(key, "lr", 1.0)
        m = self.momentum
        if not (isinstance(m, (int, float)) and 0 <= m < 1):
            raise ConfigError(f"{key}.momentum", f"must be in [0, 1), got {m!r}", f"set e.g. {key}.momentum=0.9")
        if self.grad_clip is not None:
            self.positive(key, "grad_clip", "1.0 (null: no clipping)")
        self.at_least(key, "norm_weight", 0, "0.01 (0: no chi-norm term)")
        self.at_least(key, "iterations", 1, "10 (null: as many as max_calls affords)", optional=True)
        self.at_least(key, "opt_sampling_steps", 1, "5 (null: sampling.steps)", optional=True)
        if self.keep not in KEEP:
            raise ConfigError(f"{key}.keep", f"must be best or last, got {self.keep!r}", f"set {key}.keep=best")

    def calls_needed(self, steps: int) -> tuple[int, str]:
        k = self.opt_sampling_steps or steps
        return (min_calls(k, steps, self.checkpoint),
                f"one gradient step through {k} DDIM steps (+ the final sample at sampling.steps={steps})")
