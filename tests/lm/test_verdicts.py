"""The comparison report's verdicts: paired Δ vs AdamW, intervals, one-seed wording, regime."""

from __future__ import annotations

import json
import statistics

import pytest
from scipy import stats as sps

from flatlm.lm.compare import compare
from flatlm.lm.report import collect_runs, paired_deltas, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Synthetic final losses (method -> per seed): sam is clearly lower, fsam is noise around adamw.
VAL = {
    "adamw": [6.10, 6.25, 6.05],
    "sam": [5.90, 6.04, 5.86],
    "fsam": [6.15, 6.20, 6.07],
}


def _fake_comparison(out, val=VAL, seeds=(0, 1, 2), epochs=0.08, gap=0.3):
    """Run folders as `flatlm compare` writes them, without training anything."""
    methods = list(val)
    (out / "compare.json").write_text(
        json.dumps({"methods": methods, "seeds": list(seeds), "jobs": 2, "device": "cpu"})
    )
    for method in methods:
        for i, seed in enumerate(seeds):
            run = out / "runs" / f"{method}-s{seed}"
            run.mkdir(parents=True)
            v = val[method][i]
            result = {
                "method": method, "seed": seed, "status": "completed", "step": 10, "steps": 10,
                "val_loss": v, "test_loss": v + 0.1, "val_ppl": 2.0**v, "test_ppl": 2.0**v,
                "time_per_step_s": 0.01, "train_time_s": 0.1, "skipped_steps": 0,
                "train_loss": v - gap,
                "epochs": epochs[method] if isinstance(epochs, dict) else epochs,
                "final_sharpness": {"hessian.lambda_max": 10.0 + i},
            }  # fmt: skip
            (run / "result.json").write_text(json.dumps(result))
            records = [
                {"step": 0, "split": "val", "loss": 7.0},
                {"step": 10, "split": "val", "loss": v},
            ]
            records += [
                {"step": s, "split": "sharpness", "loss": 6.0, "hessian.lambda_max": 5.0 + s,
                 "sam.logit_functional_ratio": 0.1 * (s + 1)}
                for s in (0, 5, 10)
            ]  # fmt: skip
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_paired_deltas_intervals_and_verdicts_in_table_json_and_plot(tmp_path):
    _fake_comparison(tmp_path)
    report = write_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    deltas = results["deltas_vs_adamw"]
    diffs = [s - a for s, a in zip(VAL["sam"], VAL["adamw"], strict=True)]
    mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / 3**0.5
    lo, hi = sps.t.interval(0.95, 2, loc=mean, scale=sem)
    assert deltas["sam"]["val"]["mean"] == pytest.approx(mean)
    assert (deltas["sam"]["val"]["t_low"], deltas["sam"]["val"]["t_high"]) == pytest.approx(
        (lo, hi)
    )
    assert deltas["sam"]["test"]["mean"] == pytest.approx(mean)  # test = val + 0.1 here
    assert deltas["sam"]["verdict"] == "better"
    assert deltas["fsam"]["verdict"] == "not distinguishable"
    assert deltas["adamw"]["val"]["mean"] == 0.0
    assert deltas["adamw"]["verdict"] == "not distinguishable"  # AdamW against itself
    table = report["table"]
    sam_row = [x for x in table.splitlines() if x.startswith("| sam | 3 | ")][1]  # verdict table
    assert f"{mean:+.4f} | [{lo:+.4f}, {hi:+.4f}]" in sam_row and sam_row.endswith("| better |")
    assert "λ_max(H)" in table and "| 11 |" in table  # mean of 10, 11, 12 per method
    assert "distribution-shift regime" in table
    assert "shared the cpu device" in table and results["timing"]["shared_device"] is True
    for name in ("delta_vs_adamw.png", "sharpness.png", "val_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert "![delta_vs_adamw](delta_vs_adamw.png)" in (tmp_path / "results.md").read_text()


def test_one_seed_says_no_verdict(tmp_path):
    _fake_comparison(tmp_path, val={m: v[:1] for m, v in VAL.items()}, seeds=(0,))
    report = write_report(tmp_path)
    assert "One seed: no verdict is possible" in report["table"]
    deltas = json.loads((tmp_path / "results.json").read_text())["deltas_vs_adamw"]
    assert deltas["sam"]["verdict"] == "no verdict (1 seed)"
    assert "better" not in report["table"] and "worse" not in report["table"]


def test_overfitting_regime_in_report(tmp_path):
    _fake_comparison(tmp_path, epochs=25.0, gap=1.5)
    table = write_report(tmp_path)["table"]
    assert "over-fitting regime, where plain SAM tends to help most" in table


def test_real_runs_adamw_against_itself(tiny_cfg, tmp_path):
    compare(tiny_cfg(train__steps=2), tmp_path, ["adamw"], [0, 1], quiet=True)
    runs = collect_runs(tmp_path)
    d = paired_deltas(runs, ["adamw"])["adamw"]
    assert d["val"]["mean"] == 0.0 and d["test"]["mean"] == 0.0
    assert d["verdict"] == "not distinguishable"
    for r in runs:  # the regime figures every completed run records
        assert (
            r["tokens_seen"] == 2 * 4 * 16 and r["epochs"] == r["tokens_seen"] / r["train_tokens"]
        )
        assert r["train_loss"] > 0 and "final_sharpness" not in r


def test_runs_that_did_not_complete_are_listed_never_counted_as_completed(tmp_path):
    """Diverged, interrupted and result-less runs: outside every mean, interval and verdict,
    and said so in rows of their own; a method with no completed run still gets a row."""
    val = VAL | {"gasam": [6.0, 6.1, 6.2]}
    _fake_comparison(tmp_path, val=val)

    def set_status(run, status, reason, step=10):
        path = tmp_path / "runs" / run / "result.json"
        result = json.loads(path.read_text())
        result |= {"status": status, "reason": reason, "step": step}
        if status == "diverged":
            result["val_loss"] = float("nan")
        path.write_text(json.dumps(result))

    set_status("sam-s2", "diverged", "non-finite validation loss")
    set_status("fsam-s1", "interrupted", "SIGINT or SIGTERM during step 4", step=4)
    for seed in (0, 1, 2):
        set_status(f"gasam-s{seed}", "diverged", "most steps skipped")
    started = tmp_path / "runs" / "psam-s0"  # killed before it wrote result.json
    started.mkdir()
    (started / "config.json").write_text(
        json.dumps({"optim": {"method": "psam"}, "train": {"seed": 0, "steps": 10}})
    )

    report = write_report(tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    sam = results["summary"]["sam"]
    assert sam["seeds"] == [0, 1] and sam["incomplete"] == {"diverged": 1}
    assert sam["val_loss"] == pytest.approx(statistics.fmean(VAL["sam"][:2]))  # no NaN
    assert results["deltas_vs_adamw"]["sam"]["val"]["n"] == 2
    assert "gasam" not in results["summary"] and "gasam" not in results["deltas_vs_adamw"]
    incomplete = {r["run"]: r for r in results["incomplete"]}
    assert set(incomplete) == {
        "runs/sam-s2", "runs/fsam-s1", "runs/gasam-s0", "runs/gasam-s1", "runs/gasam-s2",
        "runs/psam-s0",
    }  # fmt: skip
    assert incomplete["runs/psam-s0"]["status"] == "no result"

    table = report["table"]
    lines = table.splitlines()
    assert any(x.startswith("| sam | 2 (+1 diverged) | ") for x in lines)  # summary row
    assert any(x.startswith("| fsam | 2 (+1 interrupted) | ") for x in lines)
    assert any(x.startswith("| gasam | 0 (+3 diverged) | – |") for x in lines)
    assert "| runs/sam-s2 | diverged | 10/10 | non-finite validation loss |" in table
    assert "| runs/fsam-s1 | interrupted | 4/10 | SIGINT or SIGTERM during step 4 |" in table
    assert "| runs/psam-s0 | no result | 0/10 | no result.json" in table
    assert "6 runs did not complete" in table and "completed seeds only" in table
    sam_verdict = next(x for x in lines if x.startswith("| sam | 2 | "))
    assert sam_verdict.endswith("(completed seeds only; 1 diverged excluded) |")
    assert any(
        x.startswith("| gasam | 0 | ") and x.endswith("no verdict: no completed run (3 diverged) |")
        for x in lines
    )
    assert (tmp_path / "val_loss_by_seed.png").read_bytes()[:8] == PNG_MAGIC


def test_the_regime_is_adamws_when_adamw_is_not_listed_first(tmp_path):
    # sam first; the regime (epochs, train loss, gap and the sentence) must be AdamW's, computed
    # here from the runs' own figures, not the first method's.
    val = {"sam": VAL["sam"], "adamw": VAL["adamw"]}
    _fake_comparison(tmp_path, val=val, epochs={"sam": 25.0, "adamw": 0.08}, gap=1.5)
    report = write_report(tmp_path)
    reg = json.loads((tmp_path / "results.json").read_text())["regime"]
    mean_val = statistics.fmean(VAL["adamw"])
    assert reg["from"] == "adamw" and reg["epochs"] == pytest.approx(0.08)
    assert reg["val_loss"] == pytest.approx(mean_val)
    assert reg["train_loss"] == pytest.approx(mean_val - 1.5)
    assert "distribution-shift regime" in report["table"]
    assert "over-fitting regime" not in report["table"]


def test_the_summary_rows_against_statistics_of_the_runs(tmp_path):
    # Each run's figures varied by seed; results.json's summary recomputed here with the
    # statistics module from the values written, not from the report's code.
    _fake_comparison(tmp_path)
    written: dict[str, list[dict]] = {m: [] for m in VAL}
    for run in sorted((tmp_path / "runs").iterdir()):
        result = json.loads((run / "result.json").read_text())
        i = result["seed"]
        result |= {
            "test_loss": result["val_loss"] + 0.1 * (i + 1),
            "time_per_step_s": 0.01 * (i + 1) * (2 if result["method"] == "sam" else 1),
            "train_time_s": 0.1 * (i + 2),
            "skipped_steps": i,
        }
        (run / "result.json").write_text(json.dumps(result))
        written[result["method"]].append(result)
    write_report(tmp_path)
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    base_time = statistics.fmean(r["time_per_step_s"] for r in written["adamw"])
    for method, runs in written.items():
        row = summary[method]
        for key in ("val_loss", "test_loss", "time_per_step_s"):
            xs = [r[key] for r in runs]
            assert row[key] == pytest.approx(statistics.fmean(xs), rel=1e-12), (method, key)
            assert row[key + "_std"] == pytest.approx(statistics.stdev(xs), rel=1e-12)
        assert row["val_ppl"] == pytest.approx(statistics.fmean(2.0**v for v in VAL[method]))
        assert row["train_time_s"] == pytest.approx(statistics.fmean([0.2, 0.3, 0.4]))
        assert row["skipped_steps"] == 0 + 1 + 2
        assert row["seeds"] == [0, 1, 2]
        assert row["lambda_max"] == pytest.approx(11.0) and row["lambda_max_std"] == 1.0
        want = statistics.fmean(r["time_per_step_s"] for r in runs) / base_time
        assert row["time_vs_adamw"] == pytest.approx(want, rel=1e-12)
    assert summary["sam"]["time_vs_adamw"] == pytest.approx(2.0)
