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
    # the percentile bootstrap of the mean is close to the t-interval for well-behaved data
    assert lo == pytest.approx(d["t_low"], abs=0.04) and hi == pytest.approx(d["t_high"], abs=0.04)


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
