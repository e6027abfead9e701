"""The settings of RF-Solver / RF-Edit (techniques/rf_solver.py), declared once. Torch-free.

RF-Solver (Wang et al., ICML 2025) inverts and samples the rectified-flow ODE with a second-order Taylor step whose
velocity derivative is a finite difference over half a step (`order: 2`; `order: 1` is the Euler ablation at the
same levels), in `steps` steps. RF-Edit shares self-attention values from the source pass: during the first
`share_steps` steps of the edit the image tokens' V of the attention layers `share_blocks` (null: the last half) are
replaced by the ones the inversion stored at the same step (0: no sharing). The inversion reads the source prompt at
`source_guidance`, the edit the edit prompt at `target_guidance`. The targets and edit prompts are DDIM inversion's
(this spec extends ddim_inversion_spec.py), so one run also reports the plain Euler/DDIM inversion + prompt swap and
SDEdit rows.

Families: sd3, flux and the embedded shapes_flow as in the paper; the variance-preserving UNets (sd, sdxl, shapes) in
the ε form (the half step read at a fractional timestep; value sharing on their self-attention layers), see
rf_solver.py.

Memory: the source's V of the `share_blocks` layers, at 2 evaluations of each of the first `share_steps` steps, is
kept on the CPU for every target for the run: layers x 2 x share_steps x tokens x width numbers per image. Negligible
on the embedded generators; estimated (not measured) at about 0.6 GB per image for SD3-medium at 1024 px and 2.8 GB
for FLUX with the defaults: at that scale share fewer layers or steps, or edit fewer images per run.

FLUX's distilled guidance: works (RF-Solver needs only velocities): source_guidance and target_guidance are the
guidance inputs of the inversion and the edit (the authors' FLUX.1-dev setting: 1 and 2); on a FLUX without a
guidance input (schnell) they are ignored. Value sharing works on FLUX too (FluxAttnProcessor computes V with
attn.to_v); fused QKV projections are refused in one line when the processors are installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from steerexp.errors import ConfigError
from steerexp.spec import Facts, register
from steerexp.techniques.ddim_inversion_spec import DDIMInversionSpec


@register("technique", "rf_solver")
@dataclass
class RFSolverSpec(DDIMInversionSpec):
    """RF-Solver inversion (second order) + RF-Edit (self-attention value sharing in the first steps)."""

    offers_methods: ClassVar[tuple[str, ...]] = ("rfsolver",)   # edit methods only this technique offers
    distilled_guidance: ClassVar[str] = ("works: RF-Solver needs only velocities; source_guidance and target_guidance "
                                         "are FLUX's guidance inputs of the inversion and the edit (ignored on a FLUX "
                                         "without one)")

    _target_: str = "steerexp.techniques.rf_solver.RFSolver"
    steps: Optional[int] = None          # the solver's steps, inversion and edit alike (null: sampling.steps)
    order: int = 2                       # 2: RF-Solver (two model calls a step); 1: Euler at the same levels
    share_steps: int = 2                 # value sharing in the edit's first share_steps steps (0: none; paper 2-8)
    share_blocks: Any = None             # attention layers that share (indices, negative from the end; null: last half)
    source_guidance: float = 1.0         # the inversion's guidance, source prompt (paper, FLUX: 1)
    target_guidance: float = 2.0         # the edit's guidance, edit prompt (paper, FLUX: 2)

    def check(self, key: str) -> None:
        super().check(key)
        if self.edit.control is not None:
            raise ConfigError(f"{key}.edit.control", f"is {self.edit.control!r}, but RF-Edit shares self-attention "
                              "values (technique.share_steps), not Prompt-to-Prompt maps",
                              f"set {key}.edit.control=null")
        for name in ("steps", "order", "share_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{key}.{name}", f"must be a whole number, got {v!r}", f"set e.g. {key}.{name}=2")
        self.at_least(key, "steps", 1, 28, optional=True)
        if self.order not in (1, 2):
            raise ConfigError(f"{key}.order", f"is {self.order}; RF-Solver is order 2, and order 1 its Euler ablation",
                              f"set {key}.order=2")
        self.at_least(key, "share_steps", 0, 2)
        self.at_least(key, "source_guidance", 0, 1.0)
        self.at_least(key, "target_guidance", 0, 2.0)
        if self.share_blocks is not None:
            blocks = list(self.share_blocks) if isinstance(self.share_blocks, (list, tuple)) or \
                type(self.share_blocks).__name__ == "ListConfig" else []
            if not blocks or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
                raise ConfigError(f"{key}.share_blocks", f"must be null or a non-empty list of attention-layer "
                                  f"indices, got {self.share_blocks!r}", f"set e.g. {key}.share_blocks=[-1] (null: "
                                  "the last half)")
        if self.steps is not None:
            self.window(key, self.steps, "technique.steps")

    def window(self, key: str, steps: int, where: str) -> None:
        if self.share_steps > steps:
            raise ConfigError(f"{key}.share_steps", f"is {self.share_steps}, more than the {steps} steps ({where})",
                              f"set {key}.share_steps to at most {steps}, e.g. {key}.share_steps={min(2, steps)}")

    def check_generator(self, key: str, facts: Facts) -> None:
        super().check_generator(key, facts)
        if self.steps is None and facts.sampling_steps is not None:
            self.window(key, facts.sampling_steps, "sampling.steps")
