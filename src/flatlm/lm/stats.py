"""Verdicts a user can trust: paired differences to a baseline with confidence intervals, and the
training regime the comparison ran in.

Why paired by seed: the same seed gives every method the same initialisation and batch order, so
``method - baseline`` at one seed removes most of the seed-to-seed variation that an unpaired
mean ± std comparison leaves in. The verdict is "better" / "worse" only when the whole 95%
Student-t interval of the mean difference lies below / above zero; with one seed there is no
interval and no verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
BOOTSTRAP_MIN_SEEDS = 8  # below this a bootstrap interval is too coarse to add anything
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the report is deterministic

# Regime thresholds (documented in docs/workbench.md).
SHIFT_MAX_EPOCHS = 1.0  # under one pass over the training tokens: nothing is memorised yet
OVERFIT_MIN_EPOCHS = 4.0  # many passes ...
OVERFIT_MIN_GAP = 0.5  # ... and training loss this many nats/token below validation

NO_VERDICT = "no verdict (1 seed)"


def t_interval(xs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t interval of the mean (None below two values); zero spread gives a zero width."""
    n = len(xs)
    if n < 2:
        return None
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def bootstrap_interval(
    xs: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (a seeded generator: reproducible)."""
    x = np.asarray(xs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def verdict(interval: tuple[float, float] | None) -> str:
    """Lower loss is better: the interval of ``method - baseline`` decides."""
    if interval is None:
        return NO_VERDICT
    lo, hi = interval
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return "not distinguishable"


def paired_delta(
    method: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """``method[seed] - baseline[seed]`` over the seeds both have: mean, intervals, verdict."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None
    diffs = [method[s] - baseline[s] for s in seeds]
    ci = t_interval(diffs, confidence)
    out: dict[str, Any] = {
        "seeds": seeds,
        "n": len(seeds),
        "diffs": diffs,
        "mean": statistics.fmean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
        "confidence": confidence,
        "t_low": ci[0] if ci else None,
        "t_high": ci[1] if ci else None,
        "bootstrap_low": None,
        "bootstrap_high": None,
        "verdict": verdict(ci),
    }
    if len(diffs) >= BOOTSTRAP_MIN_SEEDS:
        out["bootstrap_low"], out["bootstrap_high"] = bootstrap_interval(diffs, confidence)
    return out


def combined_verdict(val: str, test: str) -> str:
    """One word where validation and test agree, both named where they do not."""
    return val if val == test else f"val: {val}; test: {test}"


def regime_sentence(epochs: float | None, train_loss: float | None, val_loss: float | None) -> str:
    """Which regime a comparison ran in, in one sentence (thresholds above)."""
    if epochs is None or train_loss is None or val_loss is None:
        return (
            "Regime unknown: the runs did not record tokens seen and a final training loss "
            "(they predate this flatlm version)."
        )
    gap = val_loss - train_loss
    figures = (
        f"{epochs:.2g} epochs, training loss {abs(gap):.2f} nats/token "
        f"{'below' if gap >= 0 else 'above'} validation"
    )
    if epochs < SHIFT_MAX_EPOCHS:
        return (
            f"Under one epoch ({figures}) with a later validation period: a distribution-shift "
            "regime, where the Functional-SAM paper's ordering is expected."
        )
    if epochs >= OVERFIT_MIN_EPOCHS and gap >= OVERFIT_MIN_GAP:
        return (
            f"Many epochs, train loss well below validation ({figures}): an over-fitting regime, "
            "where plain SAM tends to help most."
        )
    return (
        f"Between the two regimes ({figures}; over-fitting needs >= {OVERFIT_MIN_EPOCHS:g} "
        f"epochs and a gap >= {OVERFIT_MIN_GAP:g}): neither paper's ordering is specifically "
        "expected."
    )
