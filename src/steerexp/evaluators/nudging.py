"""nudging: the before/after table of a filter-and-nudge technique (technique=nudging).

On the protected captions (the world's by default) x eval seeds, baseline (plain) vs edited
(filtered + nudged):
  nudging/protected/not_memorised/<side>   fraction whose per-pixel RMS to EVERY protected image > threshold
  nudging/protected/shape_agreement/<side> the judge reads the same shape (colour) on the output as on
  nudging/protected/colour_agreement/<side>  the protected image the caption reproduces (the nearest protected
                                           image to the initial output): relevance to the caption's content
  nudging/protected/clip_t/<side>          CLIP-T: cosine of the output to its caption
  nudging/protected/nn_clip_cosine_median/<side>   CLIP cosine to the nearest protected image (near-copy check)
  nudging/protected/trigger_rate, rounds_mean (triggered outputs), still_triggered_rate
On ordinary prompts (the world's unrelated suite by default):
  nudging/ordinary/false_trigger_rate      the filters fire on an ordinary prompt's initial output
  nudging/ordinary/shape_agreement/<side>, colour_agreement/<side>   with the shape/colour the prompt names
  nudging/{protected,ordinary}/clean_score/<side>   on the shapes world: the analytic judge's clean-render
                                           score (1: one rendered scene explains the output; blobs score low)
The judge is a scorer of the run by name (`judge`; null: the analytic judge on the shapes world, see
evaluators/base.py); when the edit was optimised against it (a classifier filter, or technique.keep's
classifier), the agreements come from an independent judge too (nudging/independent/...).
Cost: nudging/seconds_per_image (all outputs), seconds_per_triggered_image, seconds_per_untriggered_image
(sampling + filtering only).
Logged: a per-output table and the grid samples/nudging (rows: initial | nudged | nearest protected).
"""
from __future__ import annotations

import numpy as np
import torch

from steerexp import scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.nudging_spec import NudgingSpec
from steerexp.images import image_grid, image_grid_labels, nn_rms
from steerexp.spec import check_settings
from steerexp.techniques.protocols import Filtered
from steerexp.worlds.shapes import world


def named_agreement(prompts: list[str], predicted: list[str], classes) -> float:
    """How often the prediction equals the one class of `classes` the prompt names (prompts naming one)."""
    classes = list(classes)
    hits = [p == classes[k] for prompt, p in zip(prompts, predicted) if (k := scorers.named_class(prompt, classes))
            is not None]
    return float(np.mean(hits)) if hits else float("nan")


class Nudging:
    name = "nudging"

    def __init__(self, threshold: float = 0.1, protected_prompts: list[str] | None = None,
                 ordinary_prompts: list[str] | None = None, grid_rows: int = 16, judge: str | None = None):
        check_settings(NudgingSpec, locals(), "evaluator.nudging")
        self.threshold, self.grid_rows = threshold, grid_rows
        self.protected_prompts = list(protected_prompts or world.PROTECTED_CAPTIONS)
        self.ordinary_prompts = list(ordinary_prompts or world.UNRELATED_PROMPTS)
        self.judge = judge  # a scorer of the run by name; None: the context's default judge

    @staticmethod
    def agreements(judge, prot, ordinary, nearest, infix: str = "") -> dict[str, float]:
        """Shape and colour agreement under `judge`: protected outputs with the protected image they reproduce,
        ordinary outputs with the class their prompt names."""
        m = {}
        with torch.no_grad():
            ref_pred = judge.predict(nearest)
            for side in ("baseline", "edited"):
                pred, pred_ord = judge.predict(getattr(prot, side)), judge.predict(getattr(ordinary, side))
                for head in ("shape", "colour"):
                    m[f"nudging/{infix}protected/{head}_agreement/{side}"] = float(np.mean(
                        [a == b for a, b in zip(pred[head], ref_pred[head])]))
                    m[f"nudging/{infix}ordinary/{head}_agreement/{side}"] = named_agreement(
                        ordinary.prompts, pred_ord[head], world.HEADS[head])
        return m

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        if not isinstance(tech, Filtered):
            raise ValueError("evaluator nudging needs technique=nudging (a technique that filters and nudges "
                             "each output); drop it from the evaluator list for other techniques")
        m: dict[str, float | bool] = {}
        prot, ordinary = ctx.paired(self.protected_prompts), ctx.paired(self.ordinary_prompts)
        prot_recs = tech.output_records(prot.prompts, prot.seeds)
        ord_recs = tech.output_records(ordinary.prompts, ordinary.seeds)
        refs = tech.protected_images()
        nearest = refs[[r.nearest for r in prot_recs]]
        rms_by_side = {}
        judging = ctx.judging(self.name, self.judge)
        m.update(judging.metrics())
        m.update(self.agreements(judging.scorer, prot, ordinary, nearest))
        if judging.is_objective and judging.independent:
            m.update(self.agreements(judging.independent_scorer, prot, ordinary, nearest, "independent/"))
        if ctx.world:  # clean renders vs blobs: the analytic judge's clean-render score
            analytic = ctx.reader("analytic")
            m.update({f"nudging/{kind}/clean_score/{side}": float(analytic.clean_score(getattr(pairs, side)).mean())
                      for kind, pairs in (("protected", prot), ("ordinary", ordinary))
                      for side in ("baseline", "edited")})
        with torch.no_grad():
            text = ctx.clip.encode_texts([tech.fill(p) for p in prot.prompts])
            ref_emb = ctx.clip.encode_images(refs)
            for side in ("baseline", "edited"):
                images = getattr(prot, side)
                rms = rms_by_side[side] = nn_rms(images, refs).numpy()
                m[f"nudging/protected/not_memorised/{side}"] = float((rms > self.threshold).mean())
                m[f"nudging/protected/nn_rms_median/{side}"] = float(np.median(rms))
                emb = ctx.clip.encode_images(images)
                m[f"nudging/protected/clip_t/{side}"] = float((emb * text).sum(-1).mean())
                m[f"nudging/protected/nn_clip_cosine_median/{side}"] = float(
                    (emb @ ref_emb.T).max(-1).values.median())
        trig = [r for r in prot_recs if r.triggered]
        m["nudging/protected/trigger_rate"] = float(np.mean([r.triggered for r in prot_recs]))
        m["nudging/protected/still_triggered_rate"] = float(np.mean([r.still_triggered for r in prot_recs]))
        m["nudging/protected/rounds_mean"] = float(np.mean([r.rounds for r in trig])) if trig else 0.0
        m["nudging/protected/rounds_max"] = max([r.rounds for r in trig], default=0)
        m["nudging/ordinary/false_trigger_rate"] = float(np.mean([r.triggered for r in ord_recs]))
        every = prot_recs + ord_recs
        m["nudging/seconds_per_image"] = float(np.mean([r.seconds for r in every]))
        for name, keep in (("triggered", True), ("untriggered", False)):
            secs = [r.seconds for r in every if r.triggered == keep]
            m[f"nudging/seconds_per_{name}_image"] = float(np.mean(secs)) if secs else 0.0

        rows = [[p, s, kind, r.triggered, r.rounds, r.rms_before, r.rms_after, r.clip_after, r.seconds]
                for kind, paired, recs in (("protected", prot, prot_recs), ("ordinary", ordinary, ord_recs))
                for p, s, r in zip(paired.prompts, paired.seeds, recs)]
        columns = ["prompt", "seed", "set", "triggered", "rounds", "rms_before", "rms_after", "clip_after", "seconds"]
        shown = trig or prot_recs  # rows: initial | nudged | nearest protected
        columns_shown = [torch.stack([r.initial for r in shown]), torch.stack([r.final for r in shown]),
                         refs[[r.nearest for r in shown]]]
        shown_names = [f"{p} (seed {s})" for p, s, r in zip(prot.prompts, prot.seeds, prot_recs)
                       if r.triggered or not trig]
        return EvalResult(
            metrics=m,
            grids={"samples/nudging": image_grid(columns_shown, self.grid_rows)},
            grid_labels={"samples/nudging": image_grid_labels(
                columns_shown, self.grid_rows, shown_names, ["initial", "nudged", "nearest protected"],
                what="rows: protected captions (triggered outputs when any); columns: initial output, nudged output, "
                "the nearest protected image")},
            histograms={"nudging/nn_rms": {side: rms.tolist() for side, rms in rms_by_side.items()}},
            tables={"nudging/outputs": (columns, rows)},
        )
