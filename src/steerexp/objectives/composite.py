"""The objective protocol: every objective is a weighted sum of named loss terms,

    loss = sum_k  weight_k * term_k(inputs)

A term maps one `ObjectiveInputs` record (what the technique computed for one optimisation batch)
to a scalar loss, lower is better, already multiplied by its `weight`. Every config in
conf/objective/ is a one-term `Composite`, so Hydra composes several by merging their `terms`:
`objective=[denoising,delta_l2]` is

    Composite(terms={"denoising": Denoising(...), "delta_l2": DeltaL2(...)})

and a weight is set with `objective.terms.delta_l2.weight=0.1`.

One record, two paths through the generator; a technique fills the fields of its path:
- the denoising path (textual inversion): `generator`, `latents` (the training images' VAE
  latents), `cond` (the prompts' conditioning), `rng` (the step's generator for noise and t);
- the image path (input deltas): `images` (decoded, differentiable), `start_images` (the same
  batch with zero deltas), `initial_latents` (z + delta_z), `prompts` (each image's prompt);
- both: `deltas` (name -> delta as this batch applied it: what `delta_l2` penalises).

A term names the fields it reads in `needs`; a term whose field the technique did not fill is
one clear error at the first step (e.g. concept_score with textual inversion, which renders no
images), not a TypeError deep inside.

The run's scorers and image policy come in through `bind` (run.build -> technique.bind ->
`Composite.bind` -> every term's `bind`), never from a module global: a term that reads a scorer or an
image file checks and reads it there (the shipped defaults until bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Mapping

import torch

from steerexp.images import ImagePolicy
from steerexp.scorers import Scorers

if TYPE_CHECKING:
    from steerexp.generators import FrozenGenerator

DENOISING_FIELDS = frozenset({"generator", "latents", "cond", "rng"})


@dataclass
class ObjectiveInputs:
    """What a term may look at for one optimisation batch (unfilled fields stay None / empty)."""
    images: torch.Tensor | None = None                            # [B, 3, H, W] decoded, [0, 1], differentiable
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> delta as applied to this batch
    start_images: torch.Tensor | None = None                      # [B, 3, H, W] the same batch with zero deltas
    initial_latents: torch.Tensor | None = None                   # [B, C, h, w] the initial latents used (z + delta_z)
    prompts: list[str] | None = None                              # [B] the prompt of each image
    generator: FrozenGenerator | None = None                      # the frozen generator (denoising path)
    latents: torch.Tensor | None = None                           # [B, C, h, w] the training images' VAE latents
    cond: torch.Tensor | None = None                              # the prompts' conditioning for the denoiser
    #   (or a callable t -> conditioning, t [B] the model times drawn: a timestep-dependent one, NeTI)
    rng: torch.Generator | None = None                            # seeded per step: noise and timesteps
    # (start, stop, full): this batch is rows [start, stop) of its optimizer step's batch of `full` (a step split
    # by gradient accumulation or across data-parallel ranks); random draws are made for all `full` rows and
    # sliced, so a split step draws what the whole one does. None: the whole step's batch.
    rows: tuple[int, int, int] | None = None

    def filled(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is not None and not (
            isinstance(getattr(self, f.name), dict) and not getattr(self, f.name))}


class Term:
    """One weighted loss term. Subclasses implement `loss(inputs)` (unweighted, a scalar) and name the
    `ObjectiveInputs` fields it reads in `needs`."""
    needs: frozenset[str] = frozenset({"images"})

    def __init__(self, weight: float = 1.0):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"objective term weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)
        self.scorers, self.image_policy = Scorers(), ImagePolicy()  # the shipped defaults until `bind`

    def bind(self, scorers: Scorers | None = None, image_policy: ImagePolicy | None = None) -> None:
        """Use the run's scorers and image policy (None: keep the current one). A term that reads a scorer or an
        image file checks it here (an unknown head, a scorer with no gradients): before any step."""
        if scorers is not None:
            self.scorers = scorers
        if image_policy is not None:
            self.image_policy = image_policy

    def loss(self, inputs: ObjectiveInputs) -> torch.Tensor:
        raise NotImplementedError

    def optimised_against(self) -> set[str]:
        """The run's scorers (by name, conf/config.yaml: scorers) this term optimises; none by default."""
        return set()

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        return self.weight * self.loss(inputs)


class Composite:
    """The objective: a sum of weighted terms; `last` holds each term's weighted value of the latest call."""

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

    def bind(self, scorers: Scorers | None = None, image_policy: ImagePolicy | None = None) -> None:
        """Give every term the run's scorers and image policy (Term.bind)."""
        for term in self.terms.values():
            term.bind(scorers, image_policy)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(t.needs for t in self.terms.values()))

    @property
    def needs_start(self) -> bool:
        """A term compares with the zero-delta images (the technique renders them only then)."""
        return "start_images" in self.needs

    @property
    def on_images(self) -> bool:
        """The objective scores decoded images (no term needs the denoising path)."""
        return not (self.needs & DENOISING_FIELDS)

    def optimised_against(self) -> set[str]:
        """The run's scorers the objective optimises (its terms' with a positive weight): a run judged by one
        of them reports an independent judge next to it."""
        return set().union(*(t.optimised_against() for t in self.terms.values() if t.weight > 0))

    def check(self, inputs: ObjectiveInputs) -> None:
        filled = inputs.filled()
        for name, term in self.terms.items():
            missing = sorted(term.needs - filled)
            if missing:
                path = ("the denoising path (objective=denoising, textual inversion)" if term.needs & DENOISING_FIELDS
                        else "decoded images (an input-delta technique: prompt_delta, latent_offset, ...)")
                raise ValueError(f"objective term {name!r} needs {', '.join(missing)}, which this technique does not "
                                 f"provide (it gives {', '.join(sorted(filled))}); {name} works on {path}")

    def __call__(self, inputs: ObjectiveInputs) -> torch.Tensor:
        self.check(inputs)
        values = {name: term(inputs) for name, term in self.terms.items()}
        self.last = {name: float(v.detach()) for name, v in values.items()}
        return sum(values.values())

    def __repr__(self) -> str:
        return "Composite(" + ", ".join(f"{t.weight:g} * {n}" for n, t in self.terms.items()) + ")"
