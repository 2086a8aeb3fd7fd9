"""The cost–quality chart's data: step costs, Δ with intervals, and the Pareto front."""

from __future__ import annotations

from flatlm.lm.report import cost_quality, cost_quality_table, step_costs


def _delta(mean: float, half: float) -> dict:
    return {"test": {"mean": mean, "t_low": mean - half, "t_high": mean + half, "verdict": "-"}}


DELTAS = {
    "adamw": _delta(0.0, 0.0),
    "sam": _delta(-0.20, 0.02),  # best gain, most costly
    "msam": _delta(-0.05, 0.03),  # cheap, some gain
    "psam": _delta(-0.10, 0.04),  # as costly as SAM, less gain: dominated
    "lazy": _delta(+0.01, 0.01),  # cheaper than AdamW would be impossible: same cost, worse
}
COSTS = {"adamw": 1.0, "sam": 2.0, "msam": 1.05, "psam": 2.0, "lazy": 1.0}


def test_the_pareto_front_holds_exactly_the_points_nothing_beats_on_both_axes():
    points = {p["method"]: p for p in cost_quality(DELTAS, COSTS)}
    front = {m for m, p in points.items() if p["pareto"]}
    # lazy: AdamW costs the same and loses less; psam: SAM costs the same and gains more
    assert front == {"adamw", "msam", "sam"}
    assert (points["sam"]["low"], points["sam"]["high"]) == (
        DELTAS["sam"]["test"]["t_low"],
        DELTAS["sam"]["test"]["t_high"],
    )
    assert points["adamw"]["cost"] == 1.0 and points["adamw"]["delta"] == 0.0


def test_a_method_without_a_cost_is_left_out():
    points = cost_quality(DELTAS, {**COSTS, "msam": None})
    assert "msam" not in {p["method"] for p in points}


def test_costs_come_from_the_probe_when_it_timed_every_method():
    summary = {m: {"time_vs_adamw": 9.0} for m in ("adamw", "sam")}
    probe = {"ms_per_step": {"adamw": 10.0, "sam": 21.0}}
    costs, source = step_costs(summary, probe)
    assert costs == {"adamw": 1.0, "sam": 2.1} and "alone" in source
    costs, source = step_costs(summary, {"ms_per_step": {"adamw": 10.0}})  # sam not timed
    assert costs == {"adamw": 9.0, "sam": 9.0} and "contended" in source


def test_the_table_lists_points_by_cost_and_marks_the_front():
    table = cost_quality_table(cost_quality(DELTAS, COSTS), "measured here")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["adamw", "lazy", "msam", "sam", "psam"]
    assert "| sam | 2.00 | -0.2000 | [-0.2200, -0.1800] | yes |" in table
    assert "| psam | 2.00 | -0.1000 | [-0.1400, -0.0600] |  |" in table
