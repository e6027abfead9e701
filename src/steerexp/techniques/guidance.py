"""Guidance tuning: the cheapest knobs. The edit is a set of classifier-free guidance
settings (scale, schedule, rescale phi, negative prompt as the uncond branch or as a
subtractive term), compared with the run's default sampling (`sampling.*`) on the same
prompts and seeds. Training-free; the knobs, as scalars, are the run's delta.

`strength` is the CFG scale, so the magnitude evaluator sweeps scales in one run; a
multirun over technique.scale gives one run per scale (the cfg_sweep preset).
"""
from __future__ import annotations

import dataclasses

import torch

from steerexp.generators import FrozenGenerator, Guidance
from steerexp.spec import check_settings
from steerexp.techniques.base import TrainingFree
from steerexp.techniques.guidance_spec import GuidanceSpec


class GuidanceTuning(TrainingFree):
    @classmethod
    def requirements(cls, cfg):
        if cfg.get("negative_prompt") or cfg.get("rescale") or cfg.get("schedule", "constant") != "constant":
            return {"cfg": "negative prompts, guidance rescale and guidance schedules act on the unconditional branch, "
                           "and this family's guidance is distilled (one conditional pass); tune technique.scale only"}
        return {}

    def __init__(self, generator: FrozenGenerator, scale: float = 7.5, rescale: float = 0.0,
                 schedule: str = "constant", interval_start: float = 0.0, interval_end: float = 1.0,
                 negative_prompt: str = "", negative_mode: str = "uncond", negative_weight: float = 1.0,
                 slot_word: str = "object", baseline_guider: bool = True, sampling: dict | None = None):
        check_settings(GuidanceSpec, locals())
        super().__init__(generator, sampling)
        self.edit = Guidance(scale=scale, rescale=rescale, schedule=schedule, interval_start=interval_start,
                             interval_end=interval_end, negative_prompt=negative_prompt,
                             negative_mode=negative_mode, negative_weight=negative_weight,
                             guider=self.guidance.guider)  # the run's guider (steerexp/guiders.py), at the edit's scale
        self.strength = float(scale)  # the edit's CFG scale
        self.slot_word = slot_word
        if not baseline_guider:  # the baseline: the project's own CFG (the edit, the run's guider: guider_sweep)
            self.guidance = dataclasses.replace(self.guidance, guider=None)

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(float(self.strength)), "rescale": torch.tensor(self.edit.rescale),
                "negative_weight": torch.tensor(self.edit.negative_weight if self.edit.negative_prompt else 0.0)}

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        guidance = dataclasses.replace(self.edit, scale=self.strength) if edited else self.guidance
        return self.generator.generate(texts, seeds, steps=self.sampling_steps, guidance=guidance)
