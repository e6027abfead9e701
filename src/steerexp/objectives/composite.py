"""Weighted sums of loss terms on decoded images (the objectives of the input-delta techniques).

An image objective is a `Composite` of named terms; each term maps `ObjectiveInputs` (the
decoded images of one optimisation batch, the deltas that made them, ...) to a scalar loss,
lower is better, already multiplied by its `weight`:

    loss = sum_k  weight_k * term_k(inputs)

Every term config in conf/objective/ is a one-term Composite, so Hydra composes several by
merging their `terms`: `objective=[concept_score,delta_l2]` is

    Composite(terms={"concept_score": ConceptScore(...), "delta_l2": DeltaL2(...)})

and a weight is set with `objective.terms.delta_l2.weight=0.1`. (`objective=denoising`, the
textual-inversion loss on UNet noise predictions, is a different kind of objective.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass
class ObjectiveInputs:
    """What a term may look at for one optimisation batch."""
    images: torch.Tensor                                          # [B, 3, H, W] decoded, [0, 1], differentiable
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> delta as applied to this batch
    latents: torch.Tensor | None = None                           # [B, C, h, w] the initial latents used (z + delta_z)
    start_images: torch.Tensor | None = None                      # [B, 3, H, W] the same batch with zero deltas


class Term:
    """One weighted loss term. Subclasses implement `loss(inputs)` (unweighted, a scalar)."""
    needs_start = False  # True when the term compares with the zero-delta images

    def __init__(self, weight: float = 1.0):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"objective term weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return self.weight * self.loss(inputs)


class Composite:
    """sum of weighted terms; `last` holds each term's weighted value of the latest call."""
    on_images = True  # the technique feeds it decoded images (not noise predictions)

    def __init__(self, terms: Mapping[str, Term] | list[Term]):
        items = list(terms.items()) if isinstance(terms, Mapping) else [(type(t).__name__, t) for t in terms]
        if not items:
            raise ValueError("the objective has no terms; choose at least one, e.g. objective=[concept_score,delta_l2]")
        for name, term in items:
            if not isinstance(term, Term):
                raise ValueError(f"objective term {name!r} is not a loss term (got {type(term).__name__}); "
                                 "each entry of objective.terms needs a _target_ from steerexp.objectives")
        self.terms: dict[str, Term] = dict(items)
        self.last: dict[str, float] = {}

    @property
    def needs_start(self) -> bool:
        return any(t.needs_start for t in self.terms.values())

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        values = {name: term(inputs) for name, term in self.terms.items()}
        self.last = {name: float(v.detach()) for name, v in values.items()}
        return sum(values.values())

    def __repr__(self) -> str:
        return "Composite(" + ", ".join(f"{t.weight:g} * {n}" for n, t in self.terms.items()) + ")"
