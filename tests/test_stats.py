import numpy as np
import pytest

from steerexp.evaluators import stats


def test_cohens_dz_by_hand():
    d = np.array([1.0, 2.0, 3.0])  # mean 2, sample sd 1
    assert stats.cohens_dz(d) == pytest.approx(2.0)
    assert stats.cohens_dz(np.zeros(4)) == 0.0


def test_wilcoxon_by_hand():
    # all 6 differences positive with distinct ranks: W- = 0, exact two-sided p = 2 / 2^6
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert stats.wilcoxon_p(d) == pytest.approx(2 / 64)
    assert stats.wilcoxon_p(np.zeros(5)) == 1.0


def test_bootstrap_ci_of_constant_differences_is_a_point():
    lo, hi = stats.bootstrap_ci(np.full(10, 0.3), np.repeat([0, 1], 5))
    assert lo == pytest.approx(0.3) and hi == pytest.approx(0.3)


def test_bootstrap_is_stratified_by_prompt():
    # prompt 0: all diffs 1; prompt 1: all diffs 0. Resampling within prompts keeps the mean at 0.5 exactly.
    lo, hi = stats.bootstrap_ci(np.array([1.0] * 4 + [0.0] * 4), np.repeat([0, 1], 4))
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_bootstrap_ci_covers_the_mean():
    rng = np.random.default_rng(0)
    d = rng.normal(1.0, 1.0, 200)
    lo, hi = stats.bootstrap_ci(d, np.zeros(200, int))
    assert lo < d.mean() < hi and hi - lo < 0.5


def test_paired_summary_keys_and_values():
    base = np.array([0.0, 0.0, 0.5, 0.5])
    edit = np.array([1.0, 0.0, 1.0, 0.5])
    s = stats.paired_summary(base, edit, np.array([0, 0, 1, 1]), "concept/")
    assert s["concept/paired_diff/mean"] == pytest.approx(0.375)
    assert s["concept/p_improvement"] == pytest.approx(0.5)
    # KS: ECDF baseline at 0.5 is 1.0, edited is 0.5 -> largest gap 0.5
    assert s["concept/ks_statistic"] == pytest.approx(0.5)
