"""magnitude: for a technique with a strength knob, evaluate several strengths in one run:
target rate vs strength and leakage (attribute flip rate on unrelated prompts) vs strength,
as W&B line plots and a PNG, and the sweet spot: the best target rate whose leakage stays
under tolerance."""
from __future__ import annotations

import numpy as np
import torch

from steerexp.evaluators.base import EvalContext, EvalResult
from steerexp.techniques.protocols import StrengthScalable
from steerexp.worlds.shapes import world


class Magnitude:
    name = "magnitude"

    def __init__(self, strengths: list[float] = (0.25, 0.5, 1.0, 2.0, 4.0), head: str = "shape",
                 target: str = "star", threshold: float = 0.5, tolerance: float = 0.1,
                 leakage_prompts: list[str] | None = None, leakage_heads: list[str] | None = None):
        if not strengths:
            raise ValueError("evaluator.magnitude.strengths is empty; give e.g. [0.25,0.5,1,2,4]")
        self.strengths = [float(s) for s in strengths]
        self.head, self.target, self.threshold, self.tolerance = head, target, threshold, tolerance
        self.leakage_prompts = list(leakage_prompts or world.UNRELATED_PROMPTS)
        self.leakage_heads = list(leakage_heads) if leakage_heads else None

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        tech = ctx.technique
        if not isinstance(tech, StrengthScalable):
            raise ValueError(f"evaluator magnitude needs a technique with a strength knob; "
                             f"{type(tech).__name__} has none. Remove 'magnitude' from evaluator=[...]")
        clf = ctx.classifier
        idx = clf.class_index(self.head, self.target)
        main, leak = ctx.paired(), ctx.paired(self.leakage_prompts)
        base_pred = clf.predict(leak.baseline)
        original = tech.strength
        rates, flips = [], []
        try:
            for s in self.strengths:
                tech.strength = s
                with torch.no_grad():
                    img = tech.generate(main.prompts, main.seeds, edited=True)
                    rates.append(float((clf.probs(img)[self.head][:, idx] >= self.threshold).float().mean()))
                    pred = clf.predict(tech.generate(leak.prompts, leak.seeds, edited=True))
                flipped = np.zeros(len(leak.prompts), bool)
                for head in (self.leakage_heads or pred):
                    flipped |= np.array([a != b for a, b in zip(pred[head], base_pred[head])])
                flips.append(float(flipped.mean()))
        finally:
            tech.strength = original
        ok = [i for i, f in enumerate(flips) if f <= self.tolerance]
        best = max(ok, key=lambda i: rates[i]) if ok else None
        m = {f"magnitude/target_rate/{s:g}": r for s, r in zip(self.strengths, rates)}
        m.update({f"magnitude/flip_rate/{s:g}": f for s, f in zip(self.strengths, flips)})
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
