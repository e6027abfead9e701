"""Paired comparison of two ti_heldout runs' edited samples (same prompts and seeds, so sample i of one run is
sample i of the other): the analytic judge's per-sample star score (scores.json: concept/scores/edited), its mean
difference with a bootstrap 95% CI over the pairs, and the star rates (score >= 0.5).

    python experiments/ti_heldout/paired_vs_ti.py outputs/ti_heldout_textual_inversion outputs/ti_heldout_xti
"""
import json
import sys
from pathlib import Path

import numpy as np


def edited(run: str) -> np.ndarray:
    return np.array(json.loads((Path(run) / "scores.json").read_text())["concept/scores"]["edited"])


def main(reference: str, other: str, draws: int = 10_000, seed: int = 0) -> None:
    a, b = edited(reference), edited(other)
    if a.shape != b.shape:
        raise SystemExit(f"{reference} has {len(a)} samples, {other} {len(b)}: not the same evaluation")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, len(d), (draws, len(d)))
    lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
    print(f"{other} vs {reference}: star rate {np.mean(b >= 0.5):.3f} vs {np.mean(a >= 0.5):.3f}; "
          f"mean score difference {d.mean():+.3f} (bootstrap 95% CI {lo:+.3f} to {hi:+.3f}, {len(d)} pairs); "
          f"stars in both {int(np.sum((a >= 0.5) & (b >= 0.5)))}, only in {other.rstrip('/').split('/')[-1]} "
          f"{int(np.sum((a < 0.5) & (b >= 0.5)))}, only in {reference.rstrip('/').split('/')[-1]} "
          f"{int(np.sum((a >= 0.5) & (b < 0.5)))}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
