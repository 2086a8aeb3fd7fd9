"""Verdict statistics against scipy, and the regime sentence on synthetic results."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from scipy import stats as sps

from flatlm.lm import stats

DIFFS = [-0.12, -0.05, -0.31, -0.08, -0.2]


def test_t_interval_matches_scipy():
    n = len(DIFFS)
    mean, sem = statistics.fmean(DIFFS), statistics.stdev(DIFFS) / np.sqrt(n)
    lo, hi = stats.t_interval(DIFFS)
    ref = sps.t.interval(0.95, n - 1, loc=mean, scale=sem)
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    half = sps.t.ppf(0.975, n - 1) * sem
    assert hi - mean == pytest.approx(half, rel=1e-12)
    assert stats.t_interval(DIFFS, 0.9) == pytest.approx(
        sps.t.interval(0.9, n - 1, loc=mean, scale=sem), rel=1e-12
    )


def test_verdicts_follow_the_interval():
    assert stats.verdict(stats.t_interval(DIFFS)) == "better"  # all of it below 0
    assert stats.verdict(stats.t_interval([-d for d in DIFFS])) == "worse"
    assert stats.verdict(stats.t_interval([-0.1, 0.05, 0.02])) == "not distinguishable"
    assert stats.verdict(None) == stats.NO_VERDICT


def test_method_against_itself_is_zero_and_not_distinguishable():
    losses = {0: 5.91, 1: 6.02, 2: 5.87}
    d = stats.paired_delta(losses, dict(losses))
    assert d["mean"] == 0.0 and d["t_low"] == 0.0 and d["t_high"] == 0.0
    assert d["verdict"] == "not distinguishable"


def test_one_seed_gives_no_verdict():
    d = stats.paired_delta({0: 5.9}, {0: 6.1, 1: 6.0})
    assert d["n"] == 1 and d["mean"] == pytest.approx(-0.2)
    assert d["t_low"] is None and d["verdict"] == stats.NO_VERDICT


def test_pairing_uses_common_seeds_only():
    d = stats.paired_delta({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 7.0})
    assert d["seeds"] == [0, 1] and d["diffs"] == [0.5, 1.0]


def test_bootstrap_only_from_eight_seeds_and_reproducible():
    assert (
        stats.paired_delta(dict(enumerate(DIFFS)), dict.fromkeys(range(5), 0.0))["bootstrap_low"]
        is None
    )
    xs = [-0.12, -0.05, -0.31, -0.08, -0.2, 0.03, -0.15, -0.1]
    d = stats.paired_delta(dict(enumerate(xs)), dict.fromkeys(range(8), 0.0))
    lo, hi = d["bootstrap_low"], d["bootstrap_high"]
    assert lo < d["mean"] < hi and (lo, hi) == stats.bootstrap_interval(xs)
    assert stats.bootstrap_interval(xs) == stats.bootstrap_interval(xs)  # seeded: reproducible


# Fixed, continuous data (twelve draws of N(-0.1, 0.08²), rounded).
BOOT_XS = [-0.1642, -0.2059, -0.1199, -0.0664, -0.0091, -0.0912]
BOOT_XS += [-0.1442, -0.1628, -0.0401, 0.0308, -0.0782, -0.1987]


@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_bootstrap_matches_scipy_percentile_bootstrap(confidence):
    # Reference: scipy.stats.bootstrap, percentile method, statistic = the mean, with its own
    # generator and 20x flatlm's resamples, so the two differ only by Monte-Carlo error.
    # Tolerance: the standard error of a bootstrap p-quantile from B resamples is
    # sqrt(p(1-p)/B)/f(q_p); with the bootstrap distribution of the mean ≈ N(mean, σ_b²),
    # σ_b = sd(x, ddof=0)/√n, at p = 0.025 this is 0.027·σ_b for B = 10 000 (measured on these
    # data over 100 seeds: 0.022–0.027·σ_b) and 0.006·σ_b for B = 200 000; 4 combined standard
    # errors = 0.11·σ_b. A 90% interval's ends lie (1.960 − 1.645)·σ_b = 0.31·σ_b inside a 95%
    # one's, so an interval at the wrong level fails (checked below against scipy's own).
    xs = np.array(BOOT_XS)
    sigma_b = np.std(xs) / np.sqrt(len(xs))
    lo, hi = stats.bootstrap_interval(xs, confidence)

    def scipy_interval(level):
        ci = sps.bootstrap(
            (xs,),
            np.mean,
            confidence_level=level,
            n_resamples=200_000,
            method="percentile",
            rng=np.random.default_rng(2024),
        ).confidence_interval
        return ci.low, ci.high

    ref_lo, ref_hi = scipy_interval(confidence)
    tol = 0.11 * sigma_b
    assert abs(lo - ref_lo) < tol and abs(hi - ref_hi) < tol, (lo, hi, ref_lo, ref_hi, tol)
    # the check can tell the levels apart: scipy's interval at the other level is out of reach
    other_lo, other_hi = scipy_interval(0.9 if confidence == 0.95 else 0.95)
    assert abs(lo - other_lo) > 2 * tol and abs(hi - other_hi) > 2 * tol


def _bootstrap_coverage(confidence: float, n: int = 60, samples: int = 2000) -> int:
    """How many of ``samples`` fixed-seed N(0, 1) samples of size n have 0 inside the interval.

    500 resamples instead of 10 000 keep this fast; the level comes from ``confidence``, and the
    coarser quantiles only add noise to the ends (this setting measured 0.935 at 95%, 0.886 at
    90%). The percentile bootstrap under-covers at small n (its spread is the plug-in one, with
    normal rather than t quantiles): ≈ 1.5% at n = 60, and at n = 8, the fewest seeds it is
    reported for, a "95%" interval measured 0.89 (2000 samples; the t-interval 0.95).
    """
    covered = 0
    for i in range(samples):
        x = np.random.default_rng(10_000 + i).normal(size=n)
        lo, hi = stats.bootstrap_interval(x, confidence, resamples=500, seed=i)
        covered += lo <= 0.0 <= hi
    return covered


def test_bootstrap_interval_covers_at_its_level():
    # A 95% interval must cover the true mean (0) at a rate a 90% interval does not reach:
    # with 2000 samples the binomial standard error is ≈ 0.006, so a one-sided test against
    # 0.90 separates the two levels by more than 5 standard errors.
    samples = 2000
    k95 = _bootstrap_coverage(0.95, samples=samples)
    k90 = _bootstrap_coverage(0.90, samples=samples)
    assert sps.binomtest(k95, samples, 0.90, alternative="greater").pvalue < 1e-4, k95
    assert sps.binomtest(k95, samples, 0.99, alternative="less").pvalue < 1e-4, k95  # not 99%
    # the same check on a 90% interval does not pass: the test distinguishes the levels
    assert sps.binomtest(k90, samples, 0.90, alternative="greater").pvalue > 0.05, k90
    assert k90 < k95


def test_combined_verdict():
    assert stats.combined_verdict("better", "better") == "better"
    assert stats.combined_verdict("better", "not distinguishable") == (
        "val: better; test: not distinguishable"
    )


def test_regime_sentences():
    overfit = stats.regime_sentence(epochs=25.0, train_loss=2.1, val_loss=4.3)
    assert "over-fitting regime" in overfit and "plain SAM tends to help most" in overfit
    assert "25 epochs" in overfit and "2.20 nats/token below" in overfit
    shift = stats.regime_sentence(epochs=0.086, train_loss=5.9, val_loss=6.17)
    assert shift.startswith("Under one epoch") and "distribution-shift regime" in shift
    assert "Functional-SAM paper's ordering" in shift
    between = stats.regime_sentence(epochs=2.0, train_loss=4.0, val_loss=4.2)
    assert between.startswith("Between the two regimes")
    # many epochs but no gap is not over-fitting
    assert "over-fitting regime" not in stats.regime_sentence(10.0, 4.0, 4.1)
    assert stats.regime_sentence(None, None, 4.0).startswith("Regime unknown")
