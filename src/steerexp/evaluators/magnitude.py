"""magnitude: for a technique with a strength knob, evaluate several strengths in one run:
target rate vs strength and leakage (attribute flip rate on unrelated prompts) vs strength,
as W&B line plots and a PNG, and the sweet spot: the best target rate whose leakage stays
under tolerance. Both are read by the judge (`judge`, a scorer of the run by name; null: the
analytic judge on the shapes world, see evaluators/base.py); when the edit was optimised against
it, `magnitude/independent/target_rate/<s>` and `.../flip_rate/<s>` come from an independent judge."""
from __future__ import annotations

import numpy as np
import torch

from steerexp import progress, scorers
from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.evaluators.magnitude_spec import MagnitudeSpec
from steerexp.spec import check_settings
from steerexp.techniques.protocols import StrengthScalable
from steerexp.worlds.shapes import world


class Magnitude:
    name = "magnitude"

    def __init__(self, strengths: list[float] = (0.25, 0.5, 1.0, 2.0, 4.0), head: str = "shape",
                 target: str = "star", threshold: float = 0.5, tolerance: float = 0.1,
                 leakage_prompts: list[str] | None = None, leakage_heads: list[str] | None = None,
                 judge: str | None = None):
        check_settings(MagnitudeSpec, locals(), "evaluator.magnitude")
        self.strengths = [float(s) for s in strengths]
        self.head, self.target, self.threshold, self.tolerance = head, target, threshold, tolerance
        self.leakage_prompts = list(leakage_prompts or world.UNRELATED_PROMPTS)
        self.leakage_heads = list(leakage_heads) if leakage_heads else None
        self.judge = judge  # a scorer of the run by name; None: the context's default judge

    def read(self, judge, images: torch.Tensor, leak_images: torch.Tensor, base_pred: dict) -> tuple:
        """(target hits [N] bool, leakage flips [M] bool) of one strength's images under `judge`."""
        with torch.no_grad():
            hits = (scorers.prob(judge, images, self.head, self.target) >= self.threshold).numpy()
            pred = judge.predict(leak_images)
        flipped = np.zeros(len(leak_images), bool)
        for head in (self.leakage_heads or pred):
            flipped |= np.array([a != b for a, b in zip(pred[head], base_pred[head])])
        return hits, flipped

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        if not isinstance(tech, StrengthScalable):
            raise ValueError(f"evaluator magnitude needs a technique with a strength knob; "
                             f"{type(tech).__name__} has none. Remove 'magnitude' from evaluator=[...]")
        judging = ctx.judging(self.name, self.judge, self.head, self.target)
        judges = {"": judging.scorer}  # metric infix -> judge; an independent one too when the judge is the objective's
        if judging.is_objective and judging.independent:
            judges["independent/"] = judging.independent_scorer
        main, leak = ctx.paired(), ctx.paired(self.leakage_prompts)
        with torch.no_grad():
            base_pred = {k: j.predict(leak.baseline) for k, j in judges.items()}
        original = tech.strength
        per_image = []  # [strength, set, prompt, seed, hit]
        curves = {k: ([], []) for k in judges}  # infix -> (target rates, flip rates) per strength
        try:
            for s in self.strengths:
                tech.strength = s
                images = len(main.prompts) + len(leak.prompts)
                with torch.no_grad(), progress.phase(f"magnitude: strength {s:g}", images):
                    img = tech.generate(main.prompts, main.seeds, edited=True)
                    leak_img = tech.generate(leak.prompts, leak.seeds, edited=True)
                readings = {k: self.read(judge, img, leak_img, base_pred[k]) for k, judge in judges.items()}
                for k, (hits_k, flipped_k) in readings.items():
                    curves[k][0].append(float(hits_k.mean()))
                    curves[k][1].append(float(flipped_k.mean()))
                hits, flipped = readings[""]
                per_image += [[s, "target", p, seed, bool(h)] for p, seed, h in zip(main.prompts, main.seeds, hits)]
                per_image += [[s, "leakage", p, seed, bool(f)] for p, seed, f in zip(leak.prompts, leak.seeds, flipped)]
        finally:
            tech.strength = original
        rates, flips = curves[""]
        ok = [i for i, f in enumerate(flips) if f <= self.tolerance]
        best = max(ok, key=lambda i: rates[i]) if ok else None
        m = {f"magnitude/target_rate/{s:g}": r for s, r in zip(self.strengths, rates)}
        m.update({f"magnitude/flip_rate/{s:g}": f for s, f in zip(self.strengths, flips)})
        for k, (rates_k, flips_k) in curves.items():
            if k:
                m.update({f"magnitude/{k}target_rate/{s:g}": r for s, r in zip(self.strengths, rates_k)})
                m.update({f"magnitude/{k}flip_rate/{s:g}": f for s, f in zip(self.strengths, flips_k)})
        m.update(judging.metrics())
        m["magnitude/sweet_spot_found"] = best is not None  # some strength keeps leakage under tolerance
        if best is not None:
            m["magnitude/sweet_spot"] = self.strengths[best]
            m["magnitude/sweet_spot_target_rate"] = rates[best]
        plots = {}
        if ctx.run_dir is not None:
            plots["samples/magnitude"] = str(self.plot(ctx.run_dir / "samples" / "magnitude.png", rates, flips))
        return EvalResult(
            metrics=m,
            plots=plots,
            lines={"magnitude/curves": (self.strengths, {"target_rate": rates, "flip_rate": flips}, "strength")},
            tables={"magnitude/per_image": (["strength", "set", "prompt", "seed", "hit"], per_image)},
        )

    def plot(self, path, rates, flips):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(self.strengths, rates, "o-", label=f"target rate ({self.target})")
        ax.plot(self.strengths, flips, "s--", label="leakage flip rate")
        ax.axhline(self.tolerance, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("strength")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
