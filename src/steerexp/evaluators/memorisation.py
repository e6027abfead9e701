"""memorisation: nearest-neighbour distance of each edited sample to a reference set (the
technique's own training images: overfit; or the world's protected set), per-pixel RMS on
[0, 1] and CLIP cosine; the fraction under `threshold` flags copies."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.pretrain.common import to_tensor
from steerexp.worlds.shapes import world


def rms_distances(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """[N, M] per-pixel RMS from each image to each reference (images resized to the refs' size)."""
    if images.shape[-2:] != refs.shape[-2:]:
        images = F.interpolate(images, size=refs.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    return (images.flatten(1)[:, None, :] - refs.flatten(1)[None, :, :]).pow(2).mean(-1).sqrt()


def nn_rms(images: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Per image, the smallest per-pixel RMS to any reference."""
    return rms_distances(images, refs).min(dim=1).values


class Memorisation:
    name = "memorisation"

    def __init__(self, reference: str = "targets", threshold: float = 0.1, prompts: list[str] | None = None):
        if reference not in ("targets", "protected"):
            raise ValueError(f"evaluator.memorisation.reference must be 'targets' or 'protected', got {reference!r}")
        self.reference, self.threshold, self.prompts = reference, threshold, prompts

    def references(self, ctx: EvalContext) -> torch.Tensor:
        if self.reference == "protected":
            return to_tensor(world.protected_set()[0])
        refs = getattr(ctx.technique, "target_images", None)
        if refs is None:
            raise ValueError("evaluator.memorisation.reference=targets needs a technique with target images; "
                             "use reference=protected")
        return refs

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        prompts = self.prompts or (list(world.PROTECTED_CAPTIONS) if self.reference == "protected" else None)
        paired = ctx.paired(prompts)
        refs = self.references(ctx)
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
