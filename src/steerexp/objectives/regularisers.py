"""Regularisers: keep the edit small.

- `DeltaL2`: sum over the deltas of ||delta||^2 (whole tensor; mean over seeds for per-seed
  latent offsets), optionally only some of them (`deltas: [text]`). The one way to put an L2
  on any technique's deltas: input deltas (text, latent) and textual inversion's embeddings
  (v* - v_init, `objective=[denoising,delta_l2]`).
- `Proximity`: mean squared pixel distance of the edited images to the images the same
  prompts and seeds give with zero deltas (the start of the optimisation): an output-space
  leash that an L2 on the delta does not give. `border: k` reads only the frame of the k pixels
  nearest each edge: in the shapes world the background, which an edit that moves the object
  should leave as it was (the classifier-read `attribute_keep` has no background head).
- `chi_penalty`: the chi-norm / Gaussian-shell penalty of ReNO. For z ~ N(0, I_d) the norm
  r = ||z|| follows a chi distribution with d degrees of freedom, log p(r) = (d-1) log r - r^2/2
  + const, which peaks at r* = sqrt(d-1). The penalty is its negative log-likelihood shifted to
  0 at the peak,  (r^2 - r*^2)/2 - (d-1) log(r/r*) >= 0,  about (r - r*)^2 near the shell,
  so z + delta_z stays a plausible noise sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from steerexp.objectives.composite import ObjectiveInputs, Term
from steerexp.objectives.regularisers_spec import ProximitySpec
from steerexp.spec import check_settings


def chi_penalty(z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch [B, ...] of the shifted chi NLL of each sample's norm."""
    flat = z.flatten(1).float()
    d = flat.shape[1]
    r2 = flat.pow(2).sum(1).clamp(min=1e-12)
    peak2 = d - 1.0
    return (0.5 * (r2 - peak2) - 0.5 * (d - 1) * torch.log(r2 / peak2)).mean()


def squared_norm(delta: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """||delta||^2 over the whole tensor, or the mean over dim 0 of per-sample squared norms."""
    return delta.flatten(1).pow(2).sum(1).mean() if per_sample else delta.pow(2).sum()


class DeltaL2(Term):
    needs = frozenset({"deltas"})

    def __init__(self, weight: float = 1.0, deltas: list[str] | None = None):
        super().__init__(weight)
        self.names = list(deltas) if deltas else None

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        names = self.names or list(inputs.deltas)
        unknown = [n for n in names if n not in inputs.deltas]
        if unknown:
            raise ValueError(f"objective delta_l2: unknown delta(s) {unknown}; "
                             f"this technique has {sorted(inputs.deltas)}")
        total = next(iter(inputs.deltas.values())).new_zeros(())
        for n in names:
            d = inputs.deltas[n]
            total = total + squared_norm(d, per_sample=(d.ndim == 4))  # [B, C, h, w]: per-seed latent offsets
        return total


class Proximity(Term):
    needs = frozenset({"images", "start_images"})

    def __init__(self, weight: float = 1.0, border: int | None = None):
        check_settings(ProximitySpec, locals(), "objective.terms.proximity")
        super().__init__(weight)
        self.border = border

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        if inputs.start_images is None:
            raise ValueError("objective proximity needs the zero-delta images; this technique does not provide them")
        images, start = inputs.images, inputs.start_images.to(inputs.images)
        if self.border:
            k, (h, w) = self.border, images.shape[-2:]
            if 2 * k >= min(h, w):
                raise ValueError(f"objective proximity.border={k} covers the whole {h}x{w} image; "
                                 f"choose <= {(min(h, w) - 1) // 2}")
            frame = torch.ones(h, w, dtype=torch.bool, device=images.device)
            frame[k : h - k, k : w - k] = False
            return F.mse_loss(images[..., frame], start[..., frame])
        return F.mse_loss(images, start)

