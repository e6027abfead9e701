"""What evaluators may ask of a technique: small typed capabilities, checked with isinstance.

An evaluator depends on these protocols only, never on a technique's class or private fields,
so a new technique gets every evaluator whose capability it offers by having the methods:

    PairedEdit        generate(prompts, seeds, edited): baseline and edited images on the same
                      prompts and seeds (every technique)
    Diagnosable       diagnostics(): technique-specific scalars the run reports (every technique;
                      {} by default), e.g. null-text inversion's per-step losses
    HasTargets        target_images: the images the edit was made from (textual inversion's
                      examples, the inverted originals)
    StrengthScalable  strength: a scalar that scales the edit (0 or 1 is the baseline, per
                      technique); the magnitude evaluator sweeps it
    Invertible        real images inverted: reconstruct(method) and edit(method) per inversion
                      method, with the originals, their names and world scenes
    Filtered          an edit decided per output behind filters (nudging): a record per
                      (prompt, seed), and the protected images it steers away from
    TimedInversion    inversion_seconds(method): what the inversion behind an edit method cost
                      per image (the edit benchmark adds it to the edit's own time)
    AttentionMaps     attention_maps(method, prompts): the cross-attention maps per token of a
                      Prompt-to-Prompt edit (source and target branch)
    EditMasks         masks: where the user allows an edit of their images to change them
    OptimisesAgainst  optimised_against(): the run's scorers (by name, conf/config.yaml: scorers)
                      the edit was optimised, ranked or guided against (every technique; the
                      objective's for trainable ones): the evaluators judge with another one

Prompts are templates: '{}' marks the concept slot, and `fill(template, edited)` says what
fills it (every technique; for inversion techniques '{}' is each target's own prompt instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class PairedEdit(Protocol):
    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1]: prompts[i] with seeds[i], with the edit or without it."""


@runtime_checkable
class Diagnosable(Protocol):
    def diagnostics(self) -> dict[str, Any]:
        """name -> number: what the technique measured about itself while computing its deltas."""


@runtime_checkable
class HasTargets(Protocol):
    target_images: torch.Tensor | None  # [K, 3, H, W] in [0, 1] (None before prepare())


@runtime_checkable
class StrengthScalable(Protocol):
    strength: float

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor: ...


@runtime_checkable
class Invertible(Protocol):
    images: torch.Tensor | None  # the originals [N, 3, H, W] in [0, 1]
    names: list[str]             # one per original (file names, or world<seed>_<i>)
    scenes: list | None          # world targets: the world.Scene of each original (exact object masks)

    def methods(self) -> list[str]:
        """The inversion methods it can reconstruct and edit with (vae, ddim_w<w>, npi, ...)."""

    def own_method(self) -> str: ...

    def reconstruct(self, method: str | None = None) -> torch.Tensor: ...

    def edit(self, method: str | None = None, prompts: list[str] | None = None) -> torch.Tensor:
        """The originals edited to `prompts` (default: target_prompts()) with `method`, which may add
        +p2p[+blend] (Prompt-to-Prompt attention control, local blend) to an inversion method."""

    def target_prompts(self) -> list[str]:
        """The edit prompt of each original."""


@dataclass
class OutputRecord:
    """One output of a filtered edit: its initial and final image, and what was done to it."""
    initial: torch.Tensor
    final: torch.Tensor
    triggered: bool          # the filters triggered on the initial output
    still_triggered: bool    # ... and on the final one
    rounds: int
    rms_before: float        # per-pixel RMS to the nearest protected image
    rms_after: float
    nearest: int             # index of the protected image nearest (RMS) to the initial output
    clip_after: float        # max CLIP cosine of the final output to the undesired embeddings
    offset: torch.Tensor     # the optimised offset (z_T offset or prompt delta); zeros if untouched
    seconds: float


@runtime_checkable
class TimedInversion(Protocol):
    def inverted(self, method: str | None) -> None:
        """Run now the inversion `method` reads, if it has not run (a technique that inverts lazily), so that timing
        edit(method) times the edit alone: inversion_seconds adds the inversion."""

    def inversion_seconds(self, method: str) -> float:
        """CPU seconds per image that the inversion behind `method` took (0 when it needs none, e.g. SDEdit)."""


@runtime_checkable
class AttentionMaps(Protocol):
    def attention_maps(self, method: str | None = None, prompts: list[str] | None = None
                       ) -> tuple[torch.Tensor, list[list[str]], list[list[str]]]:
        """maps [2, N, L, h, w] (source branch, target branch; token 0 is the start token) and the words of
        each source and target prompt, of the P2P edit `method` to `prompts` (default: the edit prompts)."""


@runtime_checkable
class EditMasks(Protocol):
    masks: torch.Tensor | None   # [N, H, W] bool: True where the edit may change the original (None: not given)


@runtime_checkable
class Filtered(Protocol):
    def output_records(self, prompts: list[str], seeds: list[int]) -> list[OutputRecord]:
        """A record per (template, seed) pair, running the filters (and the edit) where not done yet."""

    def protected_images(self) -> torch.Tensor:
        """[M, 3, H, W] in [0, 1]: what the edit steers away from (OutputRecord.nearest indexes it)."""

    def fill(self, template: str, edited: bool = False) -> str: ...


@runtime_checkable
class OptimisesAgainst(Protocol):
    def optimised_against(self) -> set[str] | list[str]:
        """Names of the run's scorers the edit was optimised, ranked or guided against (empty: none, e.g. a
        denoising objective). A judge among them is not independent; the evaluators then report another."""
