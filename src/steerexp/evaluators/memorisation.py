"""memorisation: nearest-neighbour distance of each edited sample to a reference set (the
technique's own training images: overfit; or the world's protected set), per-pixel RMS on
[0, 1] and CLIP cosine; the fraction under `threshold` flags copies."""
from __future__ import annotations

import numpy as np
import torch

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.memorisation_spec import MemorisationSpec
from steerexp.images import nn_rms, to_tensor
from steerexp.spec import check_settings
from steerexp.targets import fit_world
from steerexp.techniques.protocols import HasTargets
from steerexp.worlds.shapes import world


class Memorisation:
    name = "memorisation"

    def __init__(self, reference: str = "auto", threshold: float = 0.1, prompts: list[str] | None = None):
        check_settings(MemorisationSpec, locals(), "evaluator.memorisation")
        self.reference, self.threshold, self.prompts = reference, threshold, prompts

    def resolve(self, technique) -> str:
        """targets or protected: `auto` is targets when the technique has target images (a run decides it from the
        technique's spec before it starts: steerexp/combine.py; here for techniques without a spec)."""
        if self.reference != "auto":
            return self.reference
        has = isinstance(technique, HasTargets) and technique.target_images is not None
        return "targets" if has else "protected"

    def references(self, ctx: EvalContext, reference: str, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The reference images; the protected set at the world's 32 px, or, for a non-square run's images of
        `size` (height, width), drawn at 32 px on the longer side and fitted to that aspect (targets.fit_world), so
        the distances compare shapes with the run's aspect kept."""
        if reference == "protected":
            h, w = size or (1, 1)
            if h == w:
                return to_tensor(world.protected_set()[0])
            side = 32
            aspect = (round(side * h / max(h, w)), round(side * w / max(h, w)))
            pol = ctx.image_policy if ctx is not None else None  # the run's, as its world images are fitted
            return to_tensor(np.stack([fit_world(a, aspect, pol) for a in world.protected_set(side)[0]]))
        refs = ctx.technique.target_images if isinstance(ctx.technique, HasTargets) else None
        if refs is None:
            raise ValueError("evaluator.memorisation.reference=targets needs a technique with target images; "
                             "use reference=protected")
        return refs

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        reference = self.resolve(ctx.technique)
        prompts = self.prompts or (list(world.PROTECTED_CAPTIONS) if reference == "protected" else None)
        paired = ctx.paired(prompts)
        refs = self.references(ctx, reference, tuple(paired.edited.shape[-2:]))
        with torch.no_grad():
            rms = nn_rms(paired.edited, refs).numpy()
            cos = (ctx.clip.encode_images(paired.edited) @ ctx.clip.encode_images(refs).T).max(-1).values.numpy()
        return EvalResult(
            metrics={
                "memorisation/nn_rms/min": float(rms.min()),
                "memorisation/nn_rms/median": float(np.median(rms)),
                "memorisation/frac_below_threshold": float((rms < self.threshold).mean()),
                "memorisation/nn_clip_cosine/max": float(cos.max()),
                "memorisation/nn_clip_cosine/median": float(np.median(cos)),
            },
            histograms={"memorisation/nn_rms": {"edited": rms.tolist()}},
        )
