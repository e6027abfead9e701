"""Budgets: how large an edit may be. Every norm ball, joint budget and per-row clip of the
techniques lives here, so "the delta stays inside its budget" has one meaning.

    Budget       one ball per row of the last dimension, ||row|| <= max_norm
                 (textual inversion's new vectors minus their initializer; null-text inversion's
                 nulls minus the empty prompt's embedding)
    DeltaBudget  the input deltas' balls: ||delta_text|| <= eps_text (over the whole tensor, or per
                 token row), ||delta_z|| <= eps_z (per seed, or the shared offset), or one joint
                 ball (||dt|| / eps_text)^2 + (||dz|| / eps_z)^2 <= 1; and the chi-norm weight

A projection is the Euclidean one: a delta outside its ball is rescaled onto it, one inside is
left exactly as it is. L2 penalties are not budgets: they are objective terms (`delta_l2`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


EPS = 1e-12  # smallest norm divided by: a zero delta is inside every ball


def shrink(norms: torch.Tensor, radius: float) -> torch.Tensor:
    """The factor that puts a delta of these norms onto the ball of `radius`: min(1, radius / norm)."""
    return torch.clamp(radius / norms.clamp(min=EPS), max=1.0)


def clip_rows(value: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`value` with every row of its last dimension projected onto ||row|| <= max_norm."""
    return value * shrink(value.norm(dim=-1, keepdim=True), max_norm)


def _from_config(cls, spec, key: str):
    """A budget dataclass from a config mapping; an unknown key is one error naming the known ones."""
    if isinstance(spec, cls):
        return spec
    spec = dict(spec or {})
    known = [f.name for f in fields(cls)]
    unknown = [k for k in spec if k not in known]
    if "l2" in unknown:
        raise ValueError(f"{key}.l2 is not a budget: an L2 penalty is the delta_l2 objective term; drop {key}.l2 "
                         "and add it to the objective, e.g. objective=[denoising,delta_l2] "
                         "objective.terms.delta_l2.weight=0.01")
    if unknown:
        raise ValueError(f"{key} has no setting {unknown[0]!r}; its settings are {known}")
    return cls(**spec)


@dataclass
class Budget:
    """A ball per row of the last dimension: ||row|| <= max_norm (None: no ball)."""
    max_norm: float | None = None   # (its rules: textual_inversion_spec.py)

    @classmethod
    def from_config(cls, spec: Mapping | Budget | None, key: str = "technique.budget") -> Budget:
        return _from_config(cls, spec, key)

    def clip(self, value: torch.Tensor) -> torch.Tensor:
        """`value` (a delta, rows on the last dimension) projected onto the budget."""
        return value if self.max_norm is None else clip_rows(value, self.max_norm)


@dataclass
class DeltaBudget:
    """The budget of the input deltas: delta_text ("text") and delta_z ("latent")."""
    eps_text: float | None = None   # radius of the delta_text ball (null: no ball)
    eps_z: float | None = None      # radius of the delta_z ball (null: no ball)
    text_norm: str = "tensor"       # tensor: ||delta_text|| over all its entries | token: per token row
    joint: bool = False             # one budget: (||dt|| / eps_text)^2 + (||dz|| / eps_z)^2 <= 1
    chi: float = 0.0                # + chi * chi-norm penalty on z + dz (ReNO's Gaussian shell)
    # (the rules of these settings, joint's included: input_delta_spec.py)

    @classmethod
    def from_config(cls, spec: Mapping | DeltaBudget | None, key: str = "technique.budget") -> DeltaBudget:
        return _from_config(cls, spec, key)

    @property
    def radii(self) -> dict[str, float | None]:
        return {"text": self.eps_text, "latent": self.eps_z}

    def norms(self, deltas: dict[str, torch.Tensor], per_seed: bool) -> dict[str, torch.Tensor]:
        """||delta_text|| (whole, or per token row) and ||delta_z|| (per seed, or the shared one)."""
        out = {}
        if "text" in deltas:
            t = deltas["text"].detach()
            out["text"] = t.norm(dim=-1) if self.text_norm == "token" else t.norm()
        if "latent" in deltas:
            z = deltas["latent"].detach()
            out["latent"] = z.flatten(1).norm(dim=1) if per_seed else z.norm()
        return out

    def joint_norm(self, norms: dict[str, torch.Tensor]) -> torch.Tensor:
        """sqrt((||dt|| / eps_text)^2 + (||dz|| / eps_z)^2) over the given deltas: <= 1 inside the joint budget."""
        radii = self.radii
        return torch.sqrt(sum((v / radii[k]) ** 2 for k, v in norms.items()))

    @torch.no_grad()
    def project(self, deltas: dict[str, torch.Tensor], per_seed: bool) -> None:
        """Project the deltas (in place) onto their balls, or both onto the joint ball."""
        norms = self.norms(deltas, per_seed)
        if self.joint:
            u = self.joint_norm(norms)
            if u > 1:
                for delta in deltas.values():
                    delta.mul_(1 / u)
            return
        for name, eps in self.radii.items():
            if name not in norms or eps is None:
                continue
            scale = shrink(norms[name], eps)
            delta = deltas[name]
            delta.mul_(scale.view(*scale.shape, *([1] * (delta.ndim - scale.ndim))))

    def report(self, deltas: dict[str, torch.Tensor], per_seed: bool) -> dict[str, float]:
        """The largest norm of each delta (and the joint norm under a joint budget), for logging."""
        norms = self.norms(deltas, per_seed)
        out = {k: float(v.max()) for k, v in norms.items()}
        if self.joint:
            out["joint"] = float(self.joint_norm(norms))
        return out
