"""quality: diversity (mean pairwise distance between seeds of the same prompt, in pixels
and in the classifier's feature space), saturation and over-exposure statistics (for
guidance sweeps), and optional FID/KID through torchmetrics with the concept classifier as
the offline feature extractor (reference: fresh world images)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.images import to_tensor
from steerexp.worlds.shapes import world


class ClassifierFeatures(nn.Module):
    """The concept classifier's features as a torchmetrics feature extractor (uint8 or [0, 1] input)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.classifier.features(x / 255.0 if x.max() > 1.0 else x)


def pairwise_mean(x: torch.Tensor) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    d = torch.cdist(x.flatten(1), x.flatten(1))
    return float(d.sum() / (n * (n - 1)))


def saturation(images: torch.Tensor) -> dict[str, float]:
    mx, mn = images.max(dim=1).values, images.min(dim=1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-6), torch.zeros_like(mx))
    return {"saturation": float(sat.mean()),
            "clipped_fraction": float(((images <= 0.01) | (images >= 0.99)).float().mean()),
            "overexposed_fraction": float((images.min(dim=1).values >= 0.97).float().mean())}


class Quality:
    name = "quality"

    def __init__(self, fid: bool = False, reference_images: int = 512):
        self.fid, self.reference_images = fid, reference_images

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        paired = ctx.paired()
        n = len(ctx.seeds)
        m = {}
        with torch.no_grad():
            for side, images in (("baseline", paired.baseline), ("edited", paired.edited)):
                feats = F.normalize(ctx.classifier.features(images), dim=-1)
                groups = range(0, len(images), n)
                m[f"quality/diversity_pixel/{side}"] = float(np.mean(
                    [pairwise_mean(images[i:i + n]) / np.sqrt(images[0].numel()) for i in groups]))
                m[f"quality/diversity_feature/{side}"] = float(np.mean(
                    [1 - float((feats[i:i + n] @ feats[i:i + n].T).sum() - n) / max(1, n * (n - 1)) for i in groups]))
                m.update({f"quality/{k}/{side}": v for k, v in saturation(images).items()})
            if self.fid:
                m.update(self.fid_kid(ctx, paired))
        return EvalResult(metrics=m)

    def fid_kid(self, ctx: EvalContext, paired) -> dict[str, float]:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        reference = to_tensor(world.dataset(777, self.reference_images)[0])
        out = {}
        for side, images in (("baseline", paired.baseline), ("edited", paired.edited)):
            feat = ClassifierFeatures(ctx.classifier)
            fid = FrechetInceptionDistance(feature=feat, normalize=True)
            kid = KernelInceptionDistance(feature=feat, normalize=True, subset_size=min(50, len(images)))
            for metric in (fid, kid):
                metric.update(reference, real=True)
                metric.update(images, real=False)
            out[f"quality/fid/{side}"] = float(fid.compute())
            out[f"quality/kid/{side}"] = float(kid.compute()[0])
        return out
