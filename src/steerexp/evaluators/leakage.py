"""leakage: does the edit change unrelated prompts? Each prompt of the suite is run with the
same seeds with and without the edit; we measure how often any attribute the judge reads flips,
the change in the target score, pixel RMS and a perceptual distance (cosine distance of the
concept classifier's features, offline), per prompt and overall, and pass/fail against
`tolerance` on the flip rate. `heads` picks the attributes whose flips count (an edit meant
to change size should be judged on shape and colour flips). The judge is a scorer of the run
by name (`judge`; null: the analytic judge on the shapes world, see evaluators/base.py); when the
edit was optimised against it, `leakage/independent/flip_rate` and `.../passed` come from an
independent judge too."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from steerexp import scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.leakage_spec import LeakageSpec
from steerexp.images import side_by_side_grid, side_by_side_labels
from steerexp.spec import check_settings
from steerexp.worlds.shapes import world


class Leakage:
    name = "leakage"

    def __init__(self, prompts: list[str] | str | None = None, tolerance: float = 0.1, head: str = "shape",
                 target: str = "star", heads: list[str] | None = None, judge: str | None = None):
        check_settings(LeakageSpec, locals(), "evaluator.leakage")
        if isinstance(prompts, str):
            path = Path(prompts).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"evaluator.leakage.prompts: prompt file not found: {path}")
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        self.prompts = list(prompts) if prompts else list(world.UNRELATED_PROMPTS)
        if not self.prompts:
            raise ValueError("evaluator.leakage.prompts is empty; give prompts or null for the world's suite")
        self.tolerance, self.head, self.target = tolerance, head, target
        self.heads = list(heads) if heads else None  # the attributes whose flips count (null: all)
        self.judge = judge  # a scorer of the run by name; None: the context's default judge

    def flips(self, judge, paired) -> np.ndarray:
        """[N] bool: the judge reads another class of some counted head on the edited image."""
        with torch.no_grad():
            pb, pe = judge.predict(paired.baseline), judge.predict(paired.edited)
        flips = np.zeros(len(paired.prompts), bool)
        for head in (self.heads or pb):
            if head not in pb:
                raise ValueError(f"evaluator.leakage.heads: unknown head {head!r}; choose from {sorted(pb)}")
            flips |= np.array([a != b for a, b in zip(pb[head], pe[head])])
        return flips

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        paired = ctx.paired(self.prompts)
        judging = ctx.judging(self.name, self.judge)
        judge, clf = judging.scorer, ctx.classifier  # the classifier's features: the perceptual distance
        flips = self.flips(judge, paired)
        independent = {}
        if judging.is_objective and judging.independent:
            rate = float(self.flips(judging.independent_scorer, paired).mean())
            independent = {"leakage/independent/flip_rate": rate,
                           "leakage/independent/passed": bool(rate <= self.tolerance)}
        with torch.no_grad():
            sb, se = (scorers.prob(judge, images, self.head, self.target).numpy()
                      for images in (paired.baseline, paired.edited))
            rms = (paired.edited - paired.baseline).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
            perceptual = (
                (1 - F.cosine_similarity(clf.features(paired.baseline), clf.features(paired.edited)))
                .clamp(min=0)
                .numpy()
            )
        n = len(ctx.seeds)
        rows = [
            [
                p,
                float(flips[i * n : (i + 1) * n].mean()),
                float(rms[i * n : (i + 1) * n].mean()),
                float((se - sb)[i * n : (i + 1) * n].mean()),
            ]
            for i, p in enumerate(self.prompts)
        ]
        flip_rate = float(flips.mean())
        return EvalResult(
            metrics={
                "leakage/flip_rate": flip_rate,
                "leakage/target_score_change": float((se - sb).mean()),
                "leakage/pixel_rms": float(rms.mean()),
                "leakage/perceptual": float(perceptual.mean()),
                "leakage/passed": bool(flip_rate <= self.tolerance),
                **judging.metrics(),
                **independent,
            },
            grids={"samples/leakage": side_by_side_grid(paired, n)},
            grid_labels={"samples/leakage": side_by_side_labels(paired, n)},
            tables={
                "leakage/per_prompt": (["prompt", "flip_rate", "pixel_rms", "target_score_change"], rows),
                "leakage/per_image": (  # one row per pair: what the run's means (and report CIs) are made of
                    ["prompt", "seed", "flipped", "pixel_rms", "target_score_change", "perceptual"],
                    [[p, s, bool(f), float(r), float(d), float(c)]
                     for p, s, f, r, d, c in zip(paired.prompts, paired.seeds, flips, rms, se - sb, perceptual)],
                ),
            },
        )
