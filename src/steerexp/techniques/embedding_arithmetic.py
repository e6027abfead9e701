"""Embedding arithmetic: a concept direction in the text encoder's output space, computed
from paired contexts, added as alpha * direction to the user's prompt embedding.

    direction = mean_i [ E(target_i) - E(base_i) ]          E = text-encoder hidden states [L, D]

Two modes:
* `pooled` (default): the difference is averaged over token positions into one [D] vector,
  added to every position. It does not depend on where the concept words sit in the
  prompt, so it transfers to prompts of any wording.
* `aligned`: the per-token difference [L, D] is kept. It is exact when the user's prompt has
  the same layout as the contexts (a one-word substitution such as small -> large), and
  misplaced otherwise; paired contexts must tokenise to the same length.

Gating (the primer's fix for leakage): the edit is applied only to prompts whose pooled
embedding has cosine similarity >= `gate` with the base contexts' mean; others are left
exactly as they were. Training-free: `compute()` builds the direction; it is the run's delta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from steerexp.generators import FrozenGenerator
from steerexp.techniques.base import TrainingFree
from steerexp.spec import check_settings
from steerexp.techniques.embedding_arithmetic_spec import WORLD_DIRECTIONS, EmbeddingArithmeticSpec
from steerexp.worlds.shapes import world


def world_contexts(direction: str) -> tuple[list[str], list[str]]:
    """Paired contexts for the world's directions: 'size->large' and 'colour->red'."""
    shapes, positions = world.SEEN_SHAPES, world.POSITION_PHRASES
    if direction == "size->large":
        pairs = [(f"a small {c} {s} {positions[p]}", f"a large {c} {s} {positions[p]}")
                 for c in world.COLOURS for s in shapes for p in ("left", "center")]
    elif direction == "colour->red":
        pairs = [(f"a {c} {s} {positions[p]}", f"a red {s} {positions[p]}")
                 for c in world.COLOURS if c != "red" for s in shapes for p in ("left", "center")]
    else:
        raise ValueError(f"unknown world direction {direction!r}; choose one of {WORLD_DIRECTIONS}, "
                         "or give technique.base_contexts and technique.target_contexts")
    return [b for b, _ in pairs], [t for _, t in pairs]


class EmbeddingArithmetic(TrainingFree):
    def __init__(self, generator: FrozenGenerator, world_direction: str | None = "size->large",
                 base_contexts: list[str] | None = None, target_contexts: list[str] | None = None,
                 alpha: float = 1.0, mode: str = "pooled", gate: float | None = None, slot_word: str = "object",
                 sampling: dict | None = None):
        check_settings(EmbeddingArithmeticSpec, locals())
        super().__init__(generator, sampling)
        if base_contexts is None:
            base_contexts, target_contexts = world_contexts(world_direction)
        base_contexts, target_contexts = list(base_contexts), list(target_contexts)
        self.base_contexts, self.target_contexts = base_contexts, target_contexts
        self.mode, self.gate, self.slot_word = mode, gate, slot_word
        self.strength = float(alpha)  # the edit adds strength * direction
        L, D = generator.cond_shape
        self.direction = nn.Parameter(torch.zeros(L, D), requires_grad=False)
        self.register_buffer("context_centroid", torch.zeros(D))

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=-2)

    @torch.no_grad()
    def compute(self) -> None:
        gen = self.generator
        if self.mode == "aligned":
            lb = [len(gen.tokenizer(b).input_ids) for b in self.base_contexts]
            lt = [len(gen.tokenizer(t).input_ids) for t in self.target_contexts]
            bad = [i for i, (a, b) in enumerate(zip(lb, lt)) if a != b]
            if bad:
                i = bad[0]
                raise ValueError(f"mode=aligned needs paired contexts of equal token length; pair {i} "
                                 f"({self.base_contexts[i]!r} vs {self.target_contexts[i]!r}) differs. Use mode=pooled")
        base = gen.encode_prompt(self.base_contexts).float().cpu()
        target = gen.encode_prompt(self.target_contexts).float().cpu()
        diff = (target - base).mean(dim=0)
        self.direction.copy_(diff if self.mode == "aligned" else diff.mean(dim=0, keepdim=True).expand_as(diff))
        self.context_centroid.copy_(F.normalize(self.pooled(base).mean(0), dim=-1))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction.detach().cpu().contiguous(),
                "context_centroid": self.context_centroid.detach().cpu().contiguous()}

    def budgeted(self) -> dict[str, torch.Tensor]:
        return {"direction": self.direction.detach() * self.strength}

    def gate_mask(self, prompts: list[str]) -> torch.Tensor:
        """1 for prompts the edit applies to, 0 for those the gate leaves alone."""
        if self.gate is None:
            return torch.ones(len(prompts))
        with torch.no_grad():
            pooled = F.normalize(self.pooled(self.generator.encode_prompt(prompts).float().cpu()), dim=-1)
        return (pooled @ self.context_centroid >= self.gate).float()

    def generate(self, prompts: list[str], seeds: list[int], edited: bool) -> torch.Tensor:
        texts = [self.fill(p) for p in prompts]
        delta = None
        if edited and self.strength != 0:
            delta = self.strength * self.gate_mask(texts)[:, None, None] * self.direction[None]
        return self.generator.generate(texts, seeds, steps=self.sampling_steps, guidance=self.guidance, delta=delta)
