"""The settings of RF-Inversion (techniques/rf_inversion.py), declared once. Torch-free.

RF-Inversion (Rout et al., ICLR 2025) inverts with a controlled forward ODE that steers the model's (unconditional)
velocity toward a straight path to a noise sample, with strength `gamma` (0: the plain flow-ODE inversion; 1: the
noise sample itself), and edits with a controlled reverse ODE that steers the target prompt's velocity toward the
source image with strength `eta` over the steps [start, stop) (fractions of the steps, the diffusers community FLUX
pipeline's start_timestep / stop_timestep). The targets and edit prompts are DDIM inversion's (this spec extends
ddim_inversion_spec.py), so one run also reports the plain Euler/DDIM inversion + prompt swap and SDEdit rows.

Families: every family; on the variance-preserving UNets in the ε form (the schedule read as a rectified flow:
techniques/flow_edit.py, `FlowView`).

FLUX's distilled guidance: works (the paper's own model is FLUX.1-dev): the inversion reads the velocity at
`invert_guidance` and the edit at `guidance_scale`, both as the guidance input; on a FLUX without a guidance input
(schnell) they are ignored, and the controller, which needs no guidance, still applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec

INVERT_PROMPTS = ("empty", "source")


@register("technique", "rf_inversion")
@dataclass
class RFInversionSpec(DDIMInversionSpec):
    """RF-Inversion: controlled forward ODE (gamma), controlled reverse ODE (eta over [start, stop))."""

    offers_methods: ClassVar[tuple[str, ...]] = ("rfinv",)   # edit methods only this technique offers
    distilled_guidance: ClassVar[str] = ("works: the inversion and the edit pass their guidance (invert_guidance, "
                                         "guidance_scale) as FLUX's guidance input (the paper's model is FLUX.1-dev)")

    _target_: str = "steerexp.techniques.rf_inversion.RFInversion"
    gamma: float = 0.5               # controller strength of the forward ODE (paper, FLUX: 0.5)
    eta: float = 0.9                 # controller strength of the reverse ODE inside [start, stop) (paper: 0.9-1.0)
    start: float = 0.0               # the controlled interval of the edit's steps, as fractions of them: steps i with
    stop: float = 0.25               #   int(start S) <= i < int(stop S) (S = sampling.steps; diffusers community)
    invert_prompt: str = "empty"     # the forward ODE's velocity: the unconditional one (empty, the paper) or source
    seed: int = 0                    # the forward ODE's target noise y_1: image j draws from stream (seed, j)
    guidance_scale: Optional[float] = None   # the edit's guidance: null = sampling.guidance_scale

    def check(self, key: str) -> None:
        super().check(key)
        if self.edit.control is not None:
            raise ConfigError(f"{key}.edit.control", f"is {self.edit.control!r}, but RF-Inversion edits by its "
                              "controller, without attention control", f"set {key}.edit.control=null")
        self.fraction(key, "gamma", 0.5)
        self.fraction(key, "eta", 0.9)
        self.fraction(key, "start", 0.0)
        self.fraction(key, "stop", 0.25)
        if self.start > self.stop:
            raise ConfigError(f"{key}.start", f"is {self.start}, after stop={self.stop}: the controlled interval "
                              "[start, stop) must not run backwards", f"set e.g. {key}.start=0 {key}.stop=0.25")
        self.one_of(key, "invert_prompt", INVERT_PROMPTS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{key}.seed", f"must be a whole number, got {self.seed!r}", f"set e.g. {key}.seed=0")
