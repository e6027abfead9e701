"""concept: the external classifier's probability of the target concept for every paired
image, baseline vs edited, with paired statistics. The judge is a scorer of the run by name
(`scorer`; null: `scorers.user` when set, else `scorers.classifier`): any head of the concept
classifier, or a user's classifier (`scorers.user.path`: a torch module import path or a
TorchScript file) that maps [0, 1] images to logits over `scorers.user.classes`.

It also checks the prompt's other attributes: when a prompt names exactly one class of a
head (e.g. "a red {}"), `concept/attribute_agreement/<head>/<side>` is how often the
classifier reads that class.
"""
from __future__ import annotations

import numpy as np
import torch

from steerexp import scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.stats import paired_summary
from steerexp.images import side_by_side_grid


class Concept:
    name = "concept"

    def __init__(self, head: str = "shape", target: str = "star", threshold: float = 0.5,
                 scorer: str | None = None):
        if not 0 < threshold < 1:
            raise ValueError(f"evaluator.concept.threshold must be in (0, 1), got {threshold}")
        self.head, self.target, self.threshold = head, target, threshold
        self.scorer = scorer  # a scorer of the run by name; None: 'user' when scorers.user is set, else 'classifier'

    def judge(self, ctx: EvalContext):
        return ctx.scorer(self.scorer or ("user" if ctx.scorers.configured("user") else "classifier"))

    def scores(self, ctx: EvalContext, images: torch.Tensor) -> np.ndarray:
        """P(target) per image."""
        with torch.no_grad():
            return scorers.prob(self.judge(ctx), images, self.head, self.target).numpy()

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        paired = ctx.paired()
        base, edit = self.scores(ctx, paired.baseline), self.scores(ctx, paired.edited)
        strata = np.array([ctx.prompts.index(p) for p in paired.prompts])
        m: dict[str, float | bool] = {
            "concept/target_rate/baseline": float((base >= self.threshold).mean()),
            "concept/target_rate/edited": float((edit >= self.threshold).mean()),
            "concept/score_mean/baseline": float(base.mean()),
            "concept/score_mean/edited": float(edit.mean()),
        }
        m.update(paired_summary(base, edit, strata, "concept/"))
        m.update(self.attribute_agreement(ctx, paired))
        rows = []
        for i, p in enumerate(ctx.prompts):
            sel = strata == i
            rows.append([p, float((base[sel] >= self.threshold).mean()), float((edit[sel] >= self.threshold).mean()),
                         float((edit[sel] - base[sel]).mean())])
        return EvalResult(
            metrics=m,
            grids={"samples/grid": side_by_side_grid(paired, len(ctx.seeds))},
            histograms={"concept/scores": {"baseline": base.tolist(), "edited": edit.tolist()}},
            tables={
                "concept/per_prompt": (["prompt", "target_rate_baseline", "target_rate_edited", "mean_diff"], rows),
                "concept/scores": (
                    ["prompt", "seed", "baseline", "edited"],
                    [[p, s, float(b), float(e)] for p, s, b, e in zip(paired.prompts, paired.seeds, base, edit)],
                ),
            },
        )

    def attribute_agreement(self, ctx: EvalContext, paired) -> dict[str, float]:
        judge = self.judge(ctx)
        heads = {h: c for h, c in judge.heads.items() if h != judge.head_name(self.head)}
        if not heads:  # a one-head judge (a user's classifier) reads nothing else
            return {}
        out = {}
        for side, images in (("baseline", paired.baseline), ("edited", paired.edited)):
            pred = judge.predict(images)
            for head, classes in heads.items():
                hits = []
                for prompt, p in zip(paired.prompts, pred[head]):
                    named = [c for c in classes if c in prompt.replace("{}", " ").split()]
                    if len(named) == 1:
                        hits.append(p == named[0])
                if hits:
                    out[f"concept/attribute_agreement/{head}/{side}"] = float(np.mean(hits))
        return out
