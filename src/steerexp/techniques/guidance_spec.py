"""The settings of guidance tuning (techniques/guidance.py), declared once; the guidance knobs' values are the
generator's Guidance's (generators/frozen.py imports them from here). Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

from steerexp.errors import ConfigError
from steerexp.spec import register
from steerexp.techniques.base_spec import TechniqueSpec

SCHEDULES = ("constant", "interval", "weak_strong_weak")   # generators.frozen.Guidance.schedule
NEGATIVE_MODES = ("uncond", "subtract")                    # generators.frozen.Guidance.negative_mode


@register("technique", "guidance")
@dataclass
class GuidanceSpec(TechniqueSpec):
    scalable = True                 # strength is the CFG scale (the magnitude evaluator)
    _target_: str = "steerexp.techniques.guidance.GuidanceTuning"
    scale: float = 7.5              # the CFG scale of the edit (vs the default `sampling.guidance_scale`)
    rescale: float = 0.0            # guidance rescale phi in [0, 1]
    # constant | interval (the scale inside [interval_start, interval_end) of the steps, 1 outside) |
    # weak_strong_weak (1 at both ends, the scale in the middle, a sine bump)
    schedule: str = "constant"
    interval_start: float = 0.0     # interval: guidance only inside this fraction of the steps
    interval_end: float = 1.0
    negative_prompt: str = ""
    negative_mode: str = "uncond"   # uncond: the negative prompt is the uncond branch | subtract: its own term
    negative_weight: float = 1.0    # subtract: - negative_weight * (eps_negative - eps_uncond)
    slot_word: str = "object"       # fills '{}' in eval prompt templates
    # with a `guider` (conf/guider/): true, the baseline samples with it too (at sampling.guidance_scale); false, the
    # baseline keeps the project's own CFG, so the edit (the guider at technique.scale) is paired against plain CFG
    baseline_guider: bool = True

    def check(self, key: str) -> None:
        self.at_least(key, "scale", 0, 7.5)
        self.fraction(key, "rescale", 0.7)
        self.one_of(key, "schedule", SCHEDULES)
        self.one_of(key, "negative_mode", NEGATIVE_MODES)
        self.fraction(key, "interval_start", 0.0)
        self.fraction(key, "interval_end", 1.0)
        if not self.interval_start < self.interval_end:
            raise ConfigError(f"{key}.interval_end", f"must be above {key}.interval_start ({self.interval_start}), "
                              f"got {self.interval_end}", f"set e.g. {key}.interval_start=0.2 {key}.interval_end=0.8")
        if not math.isfinite(self.negative_weight):
            raise ConfigError(f"{key}.negative_weight", f"must be a finite number, got {self.negative_weight!r}",
                              f"set e.g. {key}.negative_weight=1.0")
        self.word(key, "slot_word", "object")
