"""Paired statistics for baseline-vs-edited scores (one pair = same prompt, same seed)."""
from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(diffs: np.ndarray, strata: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the mean paired difference, resampling pairs within each stratum (prompt)."""
    rng = np.random.default_rng(seed)
    groups = [diffs[strata == s] for s in np.unique(strata)]
    weights = np.array([len(g) for g in groups], dtype=float) / len(diffs)
    means = np.zeros(n_boot)
    for g, w in zip(groups, weights):
        means += w * g[rng.integers(len(g), size=(n_boot, len(g)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p; 1.0 when every difference is zero."""
    if np.allclose(diffs, 0):
        return 1.0
    return float(stats.wilcoxon(diffs, zero_method="zsplit").pvalue)


def cohens_dz(diffs: np.ndarray) -> float:
    sd = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
    return float(diffs.mean() / sd) if sd > 0 else 0.0


def paired_summary(baseline: np.ndarray, edited: np.ndarray, strata: np.ndarray, prefix: str) -> dict[str, float]:
    baseline, edited = np.asarray(baseline, float), np.asarray(edited, float)
    diffs = edited - baseline
    lo, hi = bootstrap_ci(diffs, np.asarray(strata))
    return {
        f"{prefix}paired_diff/mean": float(diffs.mean()),
        f"{prefix}paired_diff/ci_low": lo,
        f"{prefix}paired_diff/ci_high": hi,
        f"{prefix}wilcoxon_p": wilcoxon_p(diffs),
        f"{prefix}ks_statistic": float(stats.ks_2samp(baseline, edited).statistic),
        f"{prefix}cohens_dz": cohens_dz(diffs),
        f"{prefix}p_improvement": float((diffs > 0).mean()),
    }
