"""What every evaluator shares: the paired sample sets, computed once per run and reused by
all evaluators, and the run's scorers (steerexp.scorers), by name."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerexp import scorers as scorer_factory
from steerexp.scorers import HeadClassifier, Scorers
from steerexp.scorers.clip import CLIPScorer


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

    def __init__(self, technique, prompts: list[str], seeds: list[int], scorers: Scorers | None = None,
                 run_dir=None):
        if not prompts:
            raise ValueError("eval.prompts is empty; give at least one prompt template")
        if not seeds:
            raise ValueError("eval.seeds is empty; give at least one seed")
        self.technique, self.prompts, self.seeds = technique, list(prompts), list(seeds)
        self.run_dir = run_dir
        self.scorers = scorers or scorer_factory.current()  # the run's scorers (conf/config.yaml: scorers), by name
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

    def scorer(self, name: str):
        """The run's scorer `name` (e.g. 'classifier', 'clip', 'user'), on the CPU where the samples are."""
        return self.scorers.get(name)

    @property
    def classifier(self) -> HeadClassifier:
        """The run's concept classifier (scorers.classifier)."""
        return self.scorer("classifier")

    @property
    def clip(self) -> CLIPScorer:
        """The run's CLIP (scorers.clip; the clip evaluator may bring its own model)."""
        return self.scorer("clip")
