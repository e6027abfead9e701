"""What every evaluator shares: the paired sample sets and the evaluators' eyes, computed
once per run and reused by all evaluators."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from steerexp.eyes.classifier import DEFAULT_PATH as DEFAULT_CLASSIFIER, ConceptClassifier
from steerexp.eyes.clip import CLIPScorer


@dataclass
class Paired:
    """Baseline and edited images for prompts[i] with seeds[i]."""
    prompts: list[str]
    seeds: list[int]
    baseline: torch.Tensor
    edited: torch.Tensor


@dataclass
class EvalResult:
    metrics: dict[str, float | bool] = field(default_factory=dict)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)          # name -> [3, H, W]
    histograms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tables: dict[str, tuple[list[str], list[list]]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)                    # name -> PNG file written by the evaluator
    lines: dict[str, tuple] = field(default_factory=dict)                  # name -> (xs, {series: ys}, x name)


class EvalContext:
    """Shared by the evaluators of one run: sampling with and without the edit, cached."""

    def __init__(self, technique, prompts: list[str], seeds: list[int], classifier_path: str | None = None,
                 run_dir=None):
        if not prompts:
            raise ValueError("eval.prompts is empty; give at least one prompt template")
        if not seeds:
            raise ValueError("eval.seeds is empty; give at least one seed")
        self.technique, self.prompts, self.seeds = technique, list(prompts), list(seeds)
        self.run_dir = run_dir
        self._classifier_path = classifier_path
        self._cache: dict[tuple, Paired] = {}

    def paired(self, prompts: list[str] | None = None, seeds: list[int] | None = None) -> Paired:
        """Every prompt x every seed, baseline and edited (cached by prompts and seeds)."""
        prompts, seeds = list(prompts or self.prompts), list(seeds or self.seeds)
        key = (tuple(prompts), tuple(seeds))
        if key not in self._cache:
            ps = [p for p in prompts for _ in seeds]
            ss = [s for _ in prompts for s in seeds]
            with torch.no_grad():
                self._cache[key] = Paired(ps, ss, self.technique.generate(ps, ss, edited=False),
                                          self.technique.generate(ps, ss, edited=True))
        return self._cache[key]

    @cached_property
    def classifier(self) -> ConceptClassifier:
        return ConceptClassifier.from_pretrained(self._classifier_path or DEFAULT_CLASSIFIER)

    @cached_property
    def clip(self) -> CLIPScorer:
        """The shipped tiny CLIP (the clip evaluator may bring its own model)."""
        return CLIPScorer()


def side_by_side_grid(paired: Paired, n_seeds: int, gap: int = 2) -> torch.Tensor:
    """Rows are prompts, columns seeds; baseline block | edited block. [3, H, W] in [0, 1]."""
    b, e = paired.baseline, paired.edited
    n_prompts = len(b) // n_seeds
    _, c, h, w = b.shape
    rows = []
    for i in range(n_prompts):
        sl = slice(i * n_seeds, (i + 1) * n_seeds)
        left = torch.cat(list(b[sl]), dim=-1)
        right = torch.cat(list(e[sl]), dim=-1)
        rows.append(torch.cat([left, torch.ones(c, h, gap * 2), right], dim=-1))
    return torch.cat([torch.cat([r, torch.ones(c, gap, r.shape[-1])], dim=-2) for r in rows], dim=-2)


def image_grid(columns: list[torch.Tensor], rows: int, gap: int = 2) -> torch.Tensor:
    """columns: [N, 3, H, W] each; one row per image (the first `rows`), a gap between columns."""
    out = []
    for i in range(min(rows, len(columns[0]))):
        cells = []
        for c in columns:
            cells += [c[i], torch.ones(3, c.shape[-2], gap)]
        out += [torch.cat(cells[:-1], dim=-1), torch.ones(3, gap, sum(x.shape[-1] for x in cells[:-1]))]
    return torch.cat(out[:-1], dim=-2)
