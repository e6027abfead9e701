"""Direct Inversion (Ju et al., ICLR 2024, "PnP Inversion: Boosting Diffusion-based Editing with
3 Lines of Code"): null-text inversion's reconstruction without its optimisation.

The pivot x*_0 .. x*_T comes from DDIM inversion at w = 1 with the source prompt c
(ddim_inversion.py). Editing runs two branches from x*_T side by side, the source (prompt c)
and the target (the edit prompt), at guidance w with the empty null. After every step the source
branch is put back onto the inversion trajectory:

    x_src_{t-1} = DDIM step of x_src_t at w   (drifts: guidance amplifies the inversion error)
    x_src_{t-1} += x*_{t-1} - x_src_{t-1}     (the correction: = x*_{t-1})

so the source branch reconstructs the image exactly (up to the VAE: `reconstruct("di")` is the
VAE round trip), and the attention it feeds the target branch through Prompt-to-Prompt is the
attention of the real image's own trajectory, not of a drifted one. NTI buys the same thing
by optimising a null per step; here it is one subtraction per step, no gradient.

The paper adds the correction to the source branch only; the target branch is never touched
directly, so Direct Inversion needs attention control to matter: `di` without `+p2p` is exactly
the DDIM prompt swap at w (conf/technique/direct_inversion.yaml sets `edit.control: p2p`). With
local blend the source branch is corrected first, so outside the mask the target takes the
inversion trajectory itself. The two-branch loop lives in generators/attention.py
(`sample_pair(..., trajectory=...)`); the method `di` is offered by every inversion technique,
so one null-text inversion run can compare NTI + P2P with Direct Inversion + P2P on the same pivots.
"""
from __future__ import annotations

import torch

from steerexp.techniques.ddim_inversion import DDIMInversion


class DirectInversion(DDIMInversion):
    """DDIM inversion at w = 1; edit with the source branch held on the inversion trajectory."""

    def own_method(self) -> str:
        return "di"

    @torch.no_grad()
    def compute(self) -> None:
        self.invert()  # the trajectory is all Direct Inversion needs: nothing to optimise
