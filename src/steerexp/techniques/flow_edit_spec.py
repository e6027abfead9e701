"""The settings of FlowEdit (techniques/flow_edit.py), declared once. Torch-free.

FlowEdit (Kulikov et al., ICCV 2025) edits without inverting: over the steps n_max .. n_min+1 (of `steps`, counted
from the clean end, as the paper counts them) it integrates the difference of the target and source velocity fields,
averaged over `n_avg` noise draws per step; below n_min it samples plainly with the target prompt. The targets and
the edit prompts are DDIM inversion's (ddim_inversion_spec.py): this spec extends it, so one run also reports the
Euler/DDIM inversion + prompt swap and SDEdit rows beside `flowedit`.

Families: every family. On flow families (sd3, flux, shapes_flow) it is the paper's algorithm exactly; on the
variance-preserving UNets (sd, sdxl, shapes) it runs in the ε form: the schedule read as a rectified flow
(z = x / (a + b), sigma = b / (a + b), v = eps - x0, in which DDIM is exactly the Euler step), see flow_edit.py.

FLUX's distilled guidance: works. source_guidance and target_guidance are then the guidance inputs of the two
velocity fields (the paper's FLUX setting: 1.5 and 5.5). A FLUX transformer without a guidance input (schnell) cannot
apply two different scales: refused in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Optional

from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec


def default_n_max(steps: int) -> int:
    """n_max when unset: two thirds of the steps (the paper's SD3 setting, 33 of 50), at least 1."""
    return max(1, round(2 * steps / 3))


def guidance_input(facts: Facts) -> bool | None:
    """Whether a FLUX folder's transformer takes a guidance input (guidance_embeds: dev yes, schnell no); None when
    unknown (no local folder, or no readable config)."""
    if facts.folder is None:
        return None
    path = facts.folder / "transformer" / "config.json"
    try:
        return bool(json.loads(path.read_text()).get("guidance_embeds", False))
    except (OSError, ValueError):
        return None


@register("technique", "flow_edit")
@dataclass
class FlowEditSpec(DDIMInversionSpec):
    """FlowEdit: inversion-free editing by the difference of the target and source velocity fields."""

    # what the method does with FLUX's distilled guidance (each edit method says it: issue 33)
    offers_methods: ClassVar[tuple[str, ...]] = ("flowedit",)   # edit methods only this technique offers
    distilled_guidance: ClassVar[str] = ("works: source_guidance and target_guidance are the guidance inputs of the "
                                         "source and target velocity fields (refused on a FLUX without a guidance "
                                         "input when they differ)")

    _target_: str = "steerexp.techniques.flow_edit.FlowEdit"
    steps: Optional[int] = None          # T, the steps of the schedule FlowEdit walks (null: sampling.steps)
    n_max: Optional[int] = None          # start at step n_max of T, counted from the clean end (null: 2/3 of T)
    n_min: int = 0                       # below n_min: plain sampling with the target prompt (0: FlowEdit to the end)
    n_avg: int = 1                       # noise draws averaged per step
    source_guidance: float = 3.5         # guidance of the source velocity field (paper, SD3: 3.5; FLUX: 1.5)
    target_guidance: float = 13.5        # guidance of the target velocity field (paper, SD3: 13.5; FLUX: 5.5)
    seed: int = 0                        # the noise draws: image j draws from its own stream (seed, j)

    def check(self, key: str) -> None:
        super().check(key)
        if self.edit.control is not None:
            raise ConfigError(f"{key}.edit.control", f"is {self.edit.control!r}, but FlowEdit has no attention "
                              "control (it needs no source branch to take maps from)",
                              f"set {key}.edit.control=null")
        self.at_least(key, "steps", 1, 28, optional=True)
        self.at_least(key, "n_max", 1, "2/3 of the steps, e.g. 33 of 50", optional=True)
        self.at_least(key, "n_min", 0, 0)
        self.at_least(key, "n_avg", 1, 1)
        self.at_least(key, "source_guidance", 0, 3.5)
        self.at_least(key, "target_guidance", 0, 13.5)
        for name in ("steps", "n_max", "n_min", "n_avg", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{key}.{name}", f"must be a whole number, got {v!r}", f"set e.g. {key}.{name}=1")
        if self.steps is not None:
            self.window(key, self.steps, "technique.steps")

    def window(self, key: str, steps: int, where: str) -> None:
        """0 <= n_min < n_max <= steps."""
        n_max = self.n_max if self.n_max is not None else default_n_max(steps)
        if n_max > steps:
            raise ConfigError(f"{key}.n_max", f"is {n_max}, more than the {steps} steps ({where})",
                              f"set {key}.n_max to at most {steps}, e.g. {key}.n_max={default_n_max(steps)}")
        if self.n_min >= n_max:
            raise ConfigError(f"{key}.n_min", f"is {self.n_min}, not below n_max={n_max}: no FlowEdit step would run",
                              f"set {key}.n_min to at most {n_max - 1}, e.g. {key}.n_min=0")

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        if self.steps is None and facts.sampling_steps is not None:
            self.window(key, facts.sampling_steps, "sampling.steps")
        if facts.family == "flux" and self.source_guidance != self.target_guidance \
                and guidance_input(facts) is False:
            raise ConfigError(f"{key}.target_guidance", f"is {self.target_guidance} and source_guidance "
                              f"{self.source_guidance}, but this FLUX transformer has no guidance input (no distilled "
                              "guidance, e.g. schnell) and no uncond branch, so it cannot apply two scales",
                              f"use a FLUX with distilled guidance (dev), or set {key}.target_guidance="
                              f"{self.source_guidance}")
