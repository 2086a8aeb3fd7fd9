"""The comparison report: collect the runs of a comparison folder, summarise them over seeds,
pair each method with AdamW by seed, and write ``results.md``, ``results.json`` and the plots.

A comparison folder holds ``runs/<method>-s<seed>/`` (each a normal training run dir, see
:func:`run_dir`) plus ``compare.json``; :func:`write_report` rebuilds the report from those alone,
so ``flatlm report DIR`` works on any finished (or partly finished) comparison.

The verdicts come from :mod:`flatlm.lm.stats`: each method minus AdamW paired by seed, with a 95%
interval, and the regime (epochs, train-validation gap) the comparison ran in.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from flatlm.lm import stats
from flatlm.lm.plots import plot_curves, plot_deltas, plot_sharpness

RUNS = "runs"
BASELINE = "adamw"  # every verdict is "this method vs AdamW at the same seeds"


def run_dir(out: Path, method: str, seed: int) -> Path:
    """``gasam:alpha=-1`` runs in ``gasam_alpha=-1-s0`` (no ':' or ',' in folder names)."""
    return out / RUNS / f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', method)}-s{seed}"


# ----------------------------------------------------------------------------- aggregation


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def collect_runs(out: Path) -> list[dict[str, Any]]:
    """Each run dir's ``result.json`` plus its validation curve from ``metrics.jsonl``."""
    runs = []
    for result_path in sorted((out / RUNS).glob("*/result.json")):
        result = json.loads(result_path.read_text())
        metrics = result_path.parent / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["val_curve"] = [[r["step"], r["loss"]] for r in records if r["split"] == "val"]
        result["sharpness_curve"] = [
            [r["step"], r.get("hessian.lambda_max"), r.get("sam.logit_functional_ratio")]
            for r in records
            if r["split"] == "sharpness"
        ]
        result["run_dir"] = str(result_path.parent.relative_to(out))
        runs.append(result)
    return runs


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Mean ± std over seeds per method; time per step relative to AdamW's."""
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        done = [r for r in runs if r["method"] == method and r["status"] == "completed"]
        if not done:
            continue
        row: dict[str, Any] = {"seeds": sorted(r["seed"] for r in done)}
        for key in ("val_loss", "val_ppl", "test_loss", "test_ppl", "time_per_step_s"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in done])
        row["train_time_s"] = statistics.fmean(r["train_time_s"] for r in done)
        row["skipped_steps"] = sum(r["skipped_steps"] for r in done)
        # The regime: older runs lack these keys, and lambda_max needs train.sharpness_final.
        row["train_loss"] = _mean_of(done, lambda r: r.get("train_loss"))
        row["gap"] = _mean_of(
            done, lambda r: r["val_loss"] - r["train_loss"] if "train_loss" in r else None
        )
        row["epochs"] = _mean_of(done, lambda r: r.get("epochs"))
        lams = [x for x in map(final_lambda_max, done) if x is not None]
        row["lambda_max"], row["lambda_max_std"] = _mean_std(lams) if lams else (None, None)
        summary[method] = row
    base = summary.get(BASELINE, {}).get("time_per_step_s")
    for row in summary.values():
        row["time_vs_adamw"] = row["time_per_step_s"] / base if base else None
    return summary


def final_lambda_max(run: dict[str, Any]) -> float | None:
    """λ_max(H) of a run's final weights (``train.sharpness_final``), None if not computed."""
    return (run.get("final_sharpness") or {}).get("hessian.lambda_max")


def _mean_of(runs: list[dict[str, Any]], get: Any) -> float | None:
    """Mean over the runs that have the figure; None if none has it."""
    xs = [x for x in map(get, runs) if x is not None]
    return statistics.fmean(xs) if xs else None


def paired_deltas(
    runs: list[dict[str, Any]], methods: list[str], baseline: str = BASELINE
) -> dict[str, dict[str, Any]]:
    """Per method: final val/test loss minus the baseline's at the same seeds, with intervals."""
    done = [r for r in runs if r["status"] == "completed"]

    def by_seed(method: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in done if r["method"] == method}

    deltas: dict[str, dict[str, Any]] = {}
    if not any(r["method"] == baseline for r in done):
        return deltas
    for method in methods:
        d = {
            split: stats.paired_delta(
                by_seed(method, f"{split}_loss"), by_seed(baseline, f"{split}_loss")
            )
            for split in ("val", "test")
        }
        if d["val"] is None or d["test"] is None:
            continue
        deltas[method] = d | {
            "verdict": stats.combined_verdict(d["val"]["verdict"], d["test"]["verdict"])
        }
    return deltas


def regime(summary: dict[str, dict[str, Any]], baseline: str = BASELINE) -> dict[str, Any]:
    """The baseline's (else the first method's) epochs, training loss and gap, and the sentence."""
    row = summary.get(baseline) or next(iter(summary.values()), {})
    epochs, train_loss, val_loss = row.get("epochs"), row.get("train_loss"), row.get("val_loss")
    return {
        "from": baseline if baseline in summary else next(iter(summary), None),
        "epochs": epochs,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "sentence": stats.regime_sentence(epochs, train_loss, val_loss),
    }


# ----------------------------------------------------------------------------- markdown


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """Mean ± std per method; the final top Hessian eigenvalue when the runs computed it."""
    lam = any(r.get("lambda_max") is not None for r in summary.values())
    head = (
        "| method | seeds | val loss | val ppl | test loss | test ppl | ms/step | vs AdamW "
        "| train time (s) | skipped |" + (" λ_max(H) |" if lam else "") + "\n"
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if lam else "") + "\n"
    )
    lines = []
    for method, r in summary.items():
        rel = f"{r['time_vs_adamw']:.2f}x" if r["time_vs_adamw"] else "-"
        lines.append(
            f"| {method} | {len(r['seeds'])} "
            f"| {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_ppl']:.2f} ± {r['val_ppl_std']:.2f} "
            f"| {r['test_loss']:.4f} ± {r['test_loss_std']:.4f} "
            f"| {r['test_ppl']:.2f} ± {r['test_ppl_std']:.2f} "
            f"| {1000 * r['time_per_step_s']:.1f} | {rel} | {r['train_time_s']:.1f} "
            f"| {r['skipped_steps']} |" + (f" {_num(r.get('lambda_max'), '.4g')} |" if lam else "")
        )
    return head + "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(d: dict[str, Any], low: str = "t_low", high: str = "t_high") -> str:
    if d[low] is None:
        return "n/a"
    return f"[{d[low]:+.4f}, {d[high]:+.4f}]"


def verdict_table(deltas: dict[str, dict[str, Any]], baseline: str = BASELINE) -> str:
    """Δ = method − AdamW per seed, mean and 95% interval, and the verdict; says so with 1 seed."""
    if not deltas:
        return f"No verdicts: the comparison has no completed {baseline} runs to pair with.\n"
    n_max = max(d["val"]["n"] for d in deltas.values())
    boot = any(d["val"]["bootstrap_low"] is not None for d in deltas.values())
    if n_max < 2:
        intro = (
            f"**One seed: no verdict is possible.** The differences to {baseline} below are "
            "single runs and do not rank the methods; run 3 or more seeds (`--seeds 0 1 2`).\n\n"
        )
    else:
        intro = (
            f"Δ = method − {baseline} at the same seed (same init and data order), mean over "
            "seeds with a 95% Student-t interval"
            + (" and a 95% bootstrap interval" if boot else "")
            + "; negative is better. Verdict: better/worse when the whole t-interval is "
            "below/above 0, else not distinguishable at these seeds.\n\n"
        )
    cols = ["method", "seeds", "Δ val loss", "95% t-interval"]
    cols += ["95% bootstrap"] if boot else []
    cols += ["Δ test loss", "95% t-interval"] + (["95% bootstrap"] if boot else []) + ["verdict"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method, d in deltas.items():
        cells = [method, str(d["val"]["n"])]
        for split in ("val", "test"):
            cells += [f"{d[split]['mean']:+.4f}", _ci(d[split])]
            cells += [_ci(d[split], "bootstrap_low", "bootstrap_high")] if boot else []
        cells.append("baseline" if method == baseline else d["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return intro + "\n".join(lines) + "\n"


def regime_table(summary: dict[str, dict[str, Any]], reg: dict[str, Any]) -> str:
    """Epochs, final training loss, train-validation gap and λ_max per method, then the sentence."""
    lines = [
        "| method | epochs | train loss | val − train | λ_max(H) |",
        "|---|---|---|---|---|",
    ]
    for method, r in summary.items():
        lines.append(
            f"| {method} | {_num(r.get('epochs'), '.3g')} | {_num(r.get('train_loss'))} "
            f"| {_num(r.get('gap'))} | {_num(r.get('lambda_max'), '.4g')} |"
        )
    return "\n".join(lines) + f"\n\n**Regime:** {reg['sentence']}\n"


def timing_note(meta: dict[str, Any]) -> str:
    """Whether the step times were measured alone or with runs sharing the device."""
    jobs, device = meta.get("jobs"), meta.get("device", "cpu")
    if jobs is None:
        return ""
    if jobs > 1:
        return (
            f"Timing: {jobs} runs shared the {device} device at a time (`--jobs {jobs}`), so "
            "ms/step includes contention and the ratios are noisy; rerun one method with "
            "`--jobs 1` for clean step times.\n"
        )
    return f"Timing: one run at a time on {device} (`--jobs 1`).\n"


# ----------------------------------------------------------------------------- the report


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """(Re)build ``results.md``, ``results.json`` and the plots from the run dirs in ``out_dir``."""
    out = Path(out_dir)
    if not (out / RUNS).is_dir():
        raise FileNotFoundError(f"{out} is not a comparison folder (no '{RUNS}/' inside)")
    runs = collect_runs(out)
    if not runs:
        raise FileNotFoundError(f"no finished runs (runs/*/result.json) in {out}")
    meta_path = out / "compare.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    known = meta.get("methods") or []
    methods = known + sorted({r["method"] for r in runs} - set(known))
    summary = summarize(runs, methods)
    deltas = paired_deltas(runs, list(summary))
    reg = regime(summary)
    table = (
        markdown_table(summary)
        + "\n"
        + verdict_table(deltas)
        + "\n"
        + regime_table(summary, reg)
        + ("\n" + timing_note(meta) if timing_note(meta) else "")
    )
    plots = plot_curves(runs, methods, out) + plot_deltas(deltas, out, BASELINE)
    plots += plot_sharpness(runs, methods, out)
    seeds = sorted({r["seed"] for r in runs})
    text = (
        f"# flatlm comparison\n\nMean ± std over seeds {seeds}; losses are nats/token on the fixed "
        "validation/test windows; time per step is training time only (no evaluation).\n\n"
        + table
        + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    )
    (out / "results.md").write_text(text)
    results = {"summary": summary, "deltas_vs_adamw": deltas, "regime": reg}
    results |= {"runs": runs, "seeds": seeds, "methods": methods}
    results["timing"] = {"jobs": meta.get("jobs"), "device": meta.get("device")}
    results["timing"]["shared_device"] = (meta.get("jobs") or 1) > 1
    results["config"] = meta.get("config")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return {"summary": summary, "table": table, "plots": [str(p) for p in plots]}
