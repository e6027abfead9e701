"""Negative-prompt inversion (Miyake et al., WACV 2025): null-text inversion without optimisation.

NTI's optimised null embeddings drift toward the source-prompt embedding c, so NPI sets

    null_t := c          for every t

with the pivot x*_T from DDIM inversion at w = 1 (ddim_inversion.py). Reconstruction then
collapses to the conditional prediction whatever the guidance w:

    eps = eps(c) + w (eps(c) - eps(c)) = eps(c)

i.e. exactly DDIM sampling at w = 1 from x*_T. Editing puts the source prompt in the negative
(uncond) branch and the target prompt in the cond branch:

    eps_edit = eps(c_src) + w (eps(c_tgt) - eps(c_src))

No gradient is ever taken: the only delta is the inverted x*_T per image (`latents_T`).
"""
from __future__ import annotations

import torch

from steerexp.techniques.ddim_inversion import DDIMInversion


class NegativePromptInversion(DDIMInversion):
    """DDIM inversion at w = 1; reconstruct and edit with the source prompt as the null."""

    @classmethod
    def requirements(cls, cfg):
        return super().requirements(cfg) | {
            "cfg": "negative-prompt inversion puts the source prompt in the unconditional branch, and this family's "
                   "guidance is distilled (no unconditional branch); use ddim_inversion"}

    def own_method(self) -> str:
        return "npi"

    @torch.no_grad()
    def compute(self) -> None:
        self.invert()  # the source-prompt embedding is the null: nothing to optimise
