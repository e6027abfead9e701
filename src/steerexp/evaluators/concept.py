"""concept: a judge's probability of the target concept for every paired image, baseline vs
edited, with paired statistics. The judge is a scorer of the run by name (`judge`; null:
`analytic` on the shapes world, else `user` when scorers.user.path is set, else `classifier`; see
evaluators/base.py): the analytic judge, any head of a classifier, a CLIP read zero-shot, or a
user's classifier (`scorers.user.path`: a torch module import path or a TorchScript file) that
maps [0, 1] images to logits over `scorers.user.classes`.

Judges kept apart from objectives: next to the headline judge it reports
  concept/independent/target_rate/<side>   a judge the edit was not optimised against (the judge
                                           itself when it is one; none: independent_judge_found false)
  concept/objective/target_rate/<side>     the scorer the edit was optimised against (when it reads
                                           the concept); otherwise concept/classifier/target_rate/<side>,
                                           the shipped classifier's reading, when it is not the judge
  concept/judge_agreement                  edited images on which that second reader and the independent
                                           judge agree about the target (both >= threshold or both below)
  concept/reward_hacking                   the objective's scorer reports success (edited target rate >=
                                           success_rate and >= min_gain over baseline), the independent
                                           judge does not, and its rate falls short of the objective's by
                                           >= min_gain; one warning line on stderr when true
  concept/clean_score/<side>               on the shapes world: the analytic judge's clean-render score
                                           (1: one rendered scene explains the image; blobs score low)
  concept/attribute_kept/background        on the shapes world: the pairs whose edit has the background
                                           the analytic judge reads on their baseline (the shipped judges
                                           have no background head; a judge's own head comes first)
and who judged (concept/judged_by/<name>, concept/judge_is_objective).

It also checks the image's other attributes (every head of the judge but the concept's):
  concept/attribute_agreement/<head>/<side>  how often the judge reads the class the prompt names, over
                                             the prompts that name exactly one class of the head ("a red {}")
  concept/attribute_kept/<head>              over every pair, how often the judge reads the edited image's
                                             head as it reads the baseline's: what the edit kept, whether
                                             the prompt names it or not (an edit that makes every background
                                             white shows here, and in no agreement figure)
"""
from __future__ import annotations

import numpy as np
import torch

from steerexp import scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.concept_spec import ConceptSpec
from steerexp.evaluators.stats import paired_summary
from steerexp.images import side_by_side_grid, side_by_side_labels
from steerexp.spec import check_settings


class Concept:
    name = "concept"

    def __init__(self, head: str = "shape", target: str = "star", threshold: float = 0.5, judge: str | None = None,
                 success_rate: float = 0.8, min_gain: float = 0.25, scorer: str | None = None):
        if scorer is not None:
            raise ValueError(f"evaluator.concept.scorer is now evaluator.concept.judge; set "
                             f"evaluator.concept.judge={scorer}")
        check_settings(ConceptSpec, locals(), "evaluator.concept")
        self.head, self.target, self.threshold = head, target, threshold
        self.judge = judge  # a scorer of the run by name; None: the context's default judge
        self.success_rate, self.min_gain = success_rate, min_gain

    def scores(self, judge, images: torch.Tensor) -> np.ndarray:
        """P(target) per image under `judge`."""
        with torch.no_grad():
            return scorers.prob(judge, images, self.head, self.target).numpy()

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        paired = ctx.paired()
        judging = ctx.judging(self.name, self.judge, self.head, self.target)
        base, edit = self.scores(judging.scorer, paired.baseline), self.scores(judging.scorer, paired.edited)
        strata = np.array([ctx.prompts.index(p) for p in paired.prompts])
        m: dict[str, float | bool] = {
            "concept/target_rate/baseline": float((base >= self.threshold).mean()),
            "concept/target_rate/edited": float((edit >= self.threshold).mean()),
            "concept/score_mean/baseline": float(base.mean()),
            "concept/score_mean/edited": float(edit.mean()),
        }
        m.update(paired_summary(base, edit, strata, "concept/"))
        m.update(self.attribute_agreement(judging.scorer, paired))
        m.update(judging.metrics())
        m.update(self.second_readings(ctx, judging, paired, base, edit))
        if ctx.world:  # how well one rendered scene explains each image (blobs score low), and the background
            analytic = ctx.reader("analytic")
            fits = {side: analytic.fit(images) for side, images in (("baseline", paired.baseline),
                                                                    ("edited", paired.edited))}
            for side, fit in fits.items():
                m[f"concept/clean_score/{side}"] = float(fit["clean"].mean())
            # the shipped judges have no background head; the analytic judge reads the background of the scene it fits
            m.setdefault("concept/attribute_kept/background",
                         float((fits["baseline"]["background"] == fits["edited"]["background"]).double().mean()))
        rows = []
        for i, p in enumerate(ctx.prompts):
            sel = strata == i
            rows.append([p, float((base[sel] >= self.threshold).mean()), float((edit[sel] >= self.threshold).mean()),
                         float((edit[sel] - base[sel]).mean())])
        return EvalResult(
            metrics=m,
            grids={"samples/grid": side_by_side_grid(paired, len(ctx.seeds))},
            grid_labels={"samples/grid": side_by_side_labels(paired, len(ctx.seeds))},
            histograms={"concept/scores": {"baseline": base.tolist(), "edited": edit.tolist()}},
            tables={
                "concept/per_prompt": (["prompt", "target_rate_baseline", "target_rate_edited", "mean_diff"], rows),
                "concept/scores": (
                    ["prompt", "seed", "baseline", "edited"],
                    [[p, s, float(b), float(e)] for p, s, b, e in zip(paired.prompts, paired.seeds, base, edit)],
                ),
            },
        )

    def rate(self, scores: np.ndarray) -> float:
        return float((scores >= self.threshold).mean())

    def success(self, base: np.ndarray, edit: np.ndarray) -> bool:
        """A judge reports success: edited target rate >= success_rate and a gain >= min_gain over baseline."""
        return self.rate(edit) >= self.success_rate and self.rate(edit) - self.rate(base) >= self.min_gain

    def second_readings(self, ctx: EvalContext, judging, paired, base, edit) -> dict[str, float | bool]:
        """The independent judge's and the objective's scorer's readings, their agreement and the reward-hacking
        flag (module docstring)."""
        readings = {judging.name: (base, edit)}

        def read(name):
            if name not in readings:
                scorer = ctx.reader(name)
                readings[name] = (self.scores(scorer, paired.baseline), self.scores(scorer, paired.edited))
            return readings[name]

        m: dict[str, float | bool] = {}
        if judging.independent:
            ib, ie = read(judging.independent)
            m.update({"concept/independent/target_rate/baseline": self.rate(ib),
                      "concept/independent/target_rate/edited": self.rate(ie),
                      "concept/independent/paired_diff/mean": float((ie - ib).mean())})
        objective = next((o for o in judging.objective if ctx.reads(o, self.head, self.target)), None)
        second = objective or ("classifier" if judging.name != "classifier" and "classifier" in ctx.scorers.spec
                               and ctx.reads("classifier", self.head, self.target) else None)
        if second is None:
            return m
        sb, se = read(second)
        role = "objective" if objective else "classifier"
        m.update({f"concept/{role}/target_rate/baseline": self.rate(sb),
                  f"concept/{role}/target_rate/edited": self.rate(se)})
        if judging.independent and judging.independent != second:
            m["concept/judge_agreement"] = float(((se >= self.threshold) == (ie >= self.threshold)).mean())
            if objective:
                hacked = (self.success(sb, se) and not self.success(ib, ie)
                          and self.rate(se) - self.rate(ie) >= self.min_gain)
                m["concept/reward_hacking"] = hacked
                if hacked:
                    n = len(se)
                    ctx.warn(f"reward hacking: the objective's scorer {objective!r} reads {self.head}={self.target} "
                             f"on {int((se >= self.threshold).sum())}/{n} edited images (baseline "
                             f"{int((sb >= self.threshold).sum())}/{n}), the independent judge "
                             f"{judging.independent!r} on {int((ie >= self.threshold).sum())}/{n} (baseline "
                             f"{int((ib >= self.threshold).sum())}/{n}); look at samples/grid.png")
        return m

    def attribute_agreement(self, judge, paired) -> dict[str, float]:
        """The heads other than the concept's: per side, how often the judge reads the class the prompt names
        (attribute_agreement), and per pair, how often the edit reads as its baseline does (attribute_kept)."""
        heads = {h: c for h, c in judge.heads.items() if h != judge.head_name(self.head)}
        if not heads:  # a one-head judge (a user's classifier) reads nothing else
            return {}
        out = {}
        pred = {side: judge.predict(images) for side, images in (("baseline", paired.baseline),
                                                                   ("edited", paired.edited))}
        for head, classes in heads.items():
            for side in ("baseline", "edited"):
                hits = []
                for prompt, p in zip(paired.prompts, pred[side][head]):
                    k = scorers.named_class(prompt, classes)
                    if k is not None:
                        hits.append(p == classes[k])
                if hits:
                    out[f"concept/attribute_agreement/{head}/{side}"] = float(np.mean(hits))
            kept = [b == e for b, e in zip(pred["baseline"][head], pred["edited"][head])]
            if kept:
                out[f"concept/attribute_kept/{head}"] = float(np.mean(kept))
        return out
