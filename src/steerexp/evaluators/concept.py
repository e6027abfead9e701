"""concept: the external classifier's probability of the target concept for every paired
image, baseline vs edited, with paired statistics. Any head of the shipped classifier, or
a user's classifier (a torch module import path or a TorchScript file) that maps [0, 1]
images to logits over `classes`.

It also checks the prompt's other attributes: when a prompt names exactly one class of a
head (e.g. "a red {}"), `concept/attribute_agreement/<head>/<side>` is how often the
classifier reads that class.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from steerexp.evaluators.base import EvalContext, EvalResult, side_by_side_grid
from steerexp.evaluators.stats import paired_summary


def load_user_classifier(spec: str) -> torch.nn.Module:
    """'pkg.module:factory' (called with no arguments) or a TorchScript file path."""
    if spec.endswith((".pt", ".ts", ".pth")):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"evaluator.concept.classifier: TorchScript file not found: {spec}")
        return torch.jit.load(spec).eval()
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"evaluator.concept.classifier {spec!r} must be 'module.path:callable' or a TorchScript file")
    from steerexp.safety import check_callable

    check_callable(f"{module}.{attr}", "evaluator.concept.classifier")  # a shared config names code: allowlisted only
    return getattr(importlib.import_module(module), attr)().eval()


class Concept:
    name = "concept"

    def __init__(self, head: str = "shape", target: str = "star", threshold: float = 0.5,
                 classifier: str | None = None, classes: list[str] | None = None):
        if not 0 < threshold < 1:
            raise ValueError(f"evaluator.concept.threshold must be in (0, 1), got {threshold}")
        self.head, self.target, self.threshold = head, target, threshold
        self.user_classifier, self.classes = classifier, classes
        self._user_model = None

    def scores(self, ctx: EvalContext, images: torch.Tensor) -> np.ndarray:
        """P(target) per image."""
        with torch.no_grad():
            if self.user_classifier:
                if self._user_model is None:
                    self._user_model = load_user_classifier(self.user_classifier)
                model = self._user_model
                classes = list(self.classes or [])
                if self.target not in classes:
                    raise ValueError(f"evaluator.concept.classes must list the target {self.target!r} for a user classifier")
                return model(images).softmax(-1)[:, classes.index(self.target)].numpy()
            idx = ctx.classifier.class_index(self.head, self.target)
            return ctx.classifier.probs(images)[self.head][:, idx].numpy()

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
            tables={"concept/per_prompt": (["prompt", "target_rate_baseline", "target_rate_edited", "mean_diff"], rows),
                    "concept/scores": (["prompt", "seed", "baseline", "edited"],
                                       [[p, s, float(b), float(e)] for p, s, b, e in zip(paired.prompts, paired.seeds, base, edit)])},
        )

    def attribute_agreement(self, ctx: EvalContext, paired) -> dict[str, float]:
        if self.user_classifier:
            return {}
        heads = {h: c for h, c in ctx.classifier.heads.items() if h != self.head}
        out = {}
        for side, images in (("baseline", paired.baseline), ("edited", paired.edited)):
            pred = ctx.classifier.predict(images)
            for head, classes in heads.items():
                hits = []
                for prompt, p in zip(paired.prompts, pred[head]):
                    named = [c for c in classes if c in prompt.replace("{}", " ").split()]
                    if len(named) == 1:
                        hits.append(p == named[0])
                if hits:
                    out[f"concept/attribute_agreement/{head}/{side}"] = float(np.mean(hits))
        return out
