"""The comparison report: collect the runs of a comparison folder, summarise them over seeds,
pair each method with AdamW by seed, and write ``results.md``, ``results.json`` and the plots.

A comparison folder holds ``runs/<method>-s<seed>/`` (each a normal training run dir, see
:func:`run_dir`) plus ``compare.json``; :func:`write_report` rebuilds the report from those alone,
so ``flatlm report DIR`` works on any finished (or partly finished) comparison.

The verdicts come from :mod:`flatlm.lm.stats`: each method minus AdamW paired by seed, with a 95%
interval, and the regime (epochs, train-validation gap) the comparison ran in.

Only completed runs enter the means, intervals, verdicts and mean curves. Every other run
(diverged, interrupted, failed, or one that never wrote ``result.json``) is listed in its own
table with its status, step and reason, counted beside its method's seeds ("2 (+1 diverged)"),
drawn dashed in the per-seed plot, and kept under ``incomplete`` in ``results.json``: a method
whose seeds diverged is never shown as if it had completed them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Collection
from pathlib import Path
from typing import Any

from flatlm.lm import stats
from flatlm.lm._io import atomic_write_text, safe_name
from flatlm.lm.config import RESUME_ALLOWED, config_from_dict, setting_changes
from flatlm.lm.plots import plot_cost_quality, plot_curves, plot_deltas, plot_sharpness

RUNS = "runs"
BASELINE = "adamw"  # every verdict is "this method vs AdamW at the same seeds"
PROBE_FILE = "step_time_probe.json"  # flatlm.lm.compare.probe_step_times, under --jobs N > 1


def run_dir(out: Path, method: str, seed: int) -> Path:
    """``gasam:alpha=-1`` runs in ``gasam_alpha=-1-s0`` (no ':' or ',' in folder names)."""
    return out / RUNS / f"{safe_name(method)}-s{seed}"


# ----------------------------------------------------------------------------- aggregation


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


# What may differ between the runs of one comparison: each run's method and seed, and the
# settings that do not change what a run computes (threads, logging, checkpointing).
PER_RUN_SETTINGS = frozenset({"optim.method", "train.seed", *RESUME_ALLOWED} - {"train.steps"})


def settings_apart(run: dict[str, Any], comparison: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, the run's value, the comparison's)`` for every setting (of ``config.json``-style
    dicts) that makes ``run`` not one of ``comparison``'s runs. Through the config class, so a
    key added since a folder was made compares at its default."""
    changes = setting_changes(config_from_dict(comparison), config_from_dict(run))
    return [(key, mine, theirs) for key, theirs, mine in changes if key not in PER_RUN_SETTINGS]


def other_setting_runs(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The run dirs of ``out`` made with other settings than ``settings`` (the comparison's
    config): ``{"run", "method", "seed", "differs"}`` each, ``differs`` in words."""
    other = []
    for folder in sorted(p for p in (out / RUNS).glob("*") if (p / "config.json").is_file()):
        run_cfg = read_record(folder / "config.json")
        differs = settings_apart(run_cfg, settings)
        if differs:
            other.append(
                {
                    "run": str(folder.relative_to(out)),
                    "method": run_cfg.get("optim", {}).get("method"),
                    "seed": run_cfg.get("train", {}).get("seed"),
                    "differs": [
                        f"{key} = {mine!r} there, {theirs!r} in this comparison"
                        for key, mine, theirs in differs
                    ],
                }
            )
    return other


def collect_runs(out: Path, skip: Collection[str] = ()) -> list[dict[str, Any]]:
    """Each run dir's ``result.json`` plus its validation and training curves from
    ``metrics.jsonl``; a run dir without ``result.json`` (still running, or killed before its
    end) as status "no result". ``skip``: run dirs (``runs/NAME``) to leave out."""
    runs = []
    for folder in sorted(p for p in (out / RUNS).glob("*") if p.is_dir()):
        if str(folder.relative_to(out)) in skip:
            continue
        result_path = folder / "result.json"
        if result_path.is_file():
            result = read_record(result_path)
        elif (folder / "config.json").is_file():
            cfg = read_record(folder / "config.json")
            result = {
                "method": cfg.get("optim", {}).get("method", folder.name),
                "seed": cfg.get("train", {}).get("seed"),
                "status": "no result",
                "steps": cfg.get("train", {}).get("steps"),
                "reason": "no result.json: still running, or stopped before it wrote one",
            }
        else:
            continue
        records = _records(folder / "metrics.jsonl")
        if result["status"] == "no result":
            result["step"] = max((r["step"] for r in records), default=0)
        result["val_curve"] = [[r["step"], r["loss"]] for r in records if r["split"] == "val"]
        result["train_curve"] = [[r["step"], r["loss"]] for r in records if r["split"] == "train"]
        result["sharpness_curve"] = [
            [r["step"], r.get("hessian.lambda_max"), r.get("sam.logit_functional_ratio")]
            for r in records
            if r["split"] == "sharpness"
        ]
        result["run_dir"] = str(folder.relative_to(out))
        runs.append(result)
    return runs


def other_settings_note(other: list[dict[str, Any]]) -> str:
    """The runs left out of the tables for settings of their own, by name ("" when none)."""
    if not other:
        return ""
    lines = [
        f"**{len(other)} run folder{'s' if len(other) > 1 else ''} left out: made with other "
        "settings** than this comparison's (`compare.json`), so in none of the tables, verdicts "
        "or plots. Compare them in their own folder (another `--out`).",
        "",
        "| run | differs |",
        "|---|---|",
    ]
    for r in other:
        differs = "; ".join(r["differs"]).replace("|", "\\|")
        lines.append(f"| {r['run']} | {differs} |")
    return "\n".join(lines) + "\n"


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [read_record(path, line, i) for i, line in enumerate(lines, 1) if line.strip()]


# What a record must hold to be read: a run's result, a metrics line, a comparison's files.
_NEEDED = {"result.json": ("status",), "metrics.jsonl": ("step", "split")}


def read_record(path: Path, text: str | None = None, line: int = 0) -> dict[str, Any]:
    """One JSON object of a run or comparison folder (``text``: line ``line`` of ``path``),
    or a ValueError naming the file, the line and the fix: a damaged record is never skipped
    (the report would then say less than ran, silently)."""
    where = f"{path} line {line}" if line else str(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8") if text is None else text)
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
        missing = [k for k in _NEEDED.get(path.name, ()) if k not in record]
        if missing:
            raise ValueError(f"no {', '.join(repr(k) for k in missing)}")
    except (ValueError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(
            f"{where} is damaged or cut short ({why}); restore it, or delete that run's folder "
            "and run flatlm compare --resume to redo it"
        ) from None
    return record


def incomplete_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run whose status is not "completed": what it is, how far it got, and why."""
    return [
        {
            "run": r.get("run_dir", f"{r['method']}-s{r['seed']}"),
            "method": r["method"],
            "seed": r.get("seed"),
            "status": r.get("status") or "unknown",
            "step": r.get("step"),
            "steps": r.get("steps"),
            "reason": r.get("reason") or "",
        }
        for r in runs
        if r.get("status") != "completed"
    ]


def _status_counts(incomplete: list[dict[str, Any]], method: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in incomplete:
        if r["method"] == method:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def _seeds_cell(n: int, counts: dict[str, int]) -> str:
    """ "3", or "2 (+1 diverged)" when runs of the method did not complete."""
    extra = ", ".join(f"+{k} {status}" for status, k in counts.items())
    return f"{n} ({extra})" if extra else str(n)


def step_costs(
    summary: dict[str, dict[str, Any]], probe: dict[str, Any] | None, baseline: str = BASELINE
) -> tuple[dict[str, float | None], str]:
    """Each method's step time relative to the baseline's, and where it came from: the probe
    that timed every method alone (uncontended) when it timed them all, else the runs' own
    training time (contended when runs shared the machine)."""
    ms = (probe or {}).get("ms_per_step") or {}
    if ms.get(baseline) and all(ms.get(m) for m in summary):
        return {m: ms[m] / ms[baseline] for m in summary}, "timed alone (step-time probe)"
    return (
        {m: row.get("time_vs_adamw") for m, row in summary.items()},
        "the runs' own training time (contended if runs shared the machine)",
    )


def cost_quality(
    deltas: dict[str, dict[str, Any]],
    costs: dict[str, float | None],
    baseline: str = BASELINE,
    split: str = "test",
) -> list[dict[str, Any]]:
    """One point per method: ``cost`` (step time × the baseline's), ``delta`` (mean Δ ``split``
    loss vs the baseline, paired by seed) with its 95% t-interval (``low``, ``high``), and
    ``pareto``: no other point is at most as costly with at most as large a Δ, one of them
    strictly (the front uses the means; read the intervals before calling one point better)."""
    points = [{"method": baseline, "cost": 1.0, "delta": 0.0, "low": None, "high": None}]
    for method, d in deltas.items():
        if method == baseline or costs.get(method) is None:
            continue
        s = d[split]
        points.append(
            {
                "method": method,
                "cost": costs[method],
                "delta": s["mean"],
                "low": s["t_low"],
                "high": s["t_high"],
                "verdict": s.get("verdict"),
            }
        )
    for p in points:
        p["pareto"] = not any(_dominates(q, p) for q in points if q is not p)
    return points


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    at_most = a["cost"] <= b["cost"] and a["delta"] <= b["delta"]
    return at_most and (a["cost"] < b["cost"] or a["delta"] < b["delta"])


def cost_quality_table(points: list[dict[str, Any]], source: str) -> str:
    """The chart's table: cost, Δ test with its interval, on the Pareto front or not."""
    lines = [
        f"Cost against gain (cost: step time relative to {points[0]['method']}, {source}; "
        "Δ test loss paired by seed, 95% t-interval):\n",
        "| method | step time × AdamW | Δ test | 95% t-interval | Pareto front |",
        "|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: p["cost"]):
        ci = "–" if p["low"] is None else f"[{p['low']:+.4f}, {p['high']:+.4f}]"
        delta = "baseline" if p is points[0] else f"{p['delta']:+.4f}"
        front = "yes" if p["pareto"] else ""
        lines.append(f"| {p['method']} | {p['cost']:.2f} | {delta} | {ci} | {front} |")
    return "\n".join(lines) + "\n"


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Mean ± std over each method's completed runs; time per step relative to AdamW's."""
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
        row["rho_schedule"] = done[0].get("rho_schedule", "constant")
        row["step_counts"] = _mean_counts(done)
        row["passes_per_step"] = _mean_of(done, lambda r: r.get("passes_per_step"))
        lams = [x for x in map(final_lambda_max, done) if x is not None]
        row["lambda_max"], row["lambda_max_std"] = _mean_std(lams) if lams else (None, None)
        summary[method] = row
    base = summary.get(BASELINE, {}).get("time_per_step_s")
    for row in summary.values():
        row["time_vs_adamw"] = row["time_per_step_s"] / base if base else None
    return summary


def _mean_counts(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Fresh, reuse and plain steps per run, the mean over the runs (None if any run lacks
    them: made before the optimizer counted its steps)."""
    counts = [r.get("step_counts") for r in runs]
    if any(c is None for c in counts):
        return None
    return {k: statistics.fmean(c[k] for c in counts) for k in ("fresh", "reuse", "plain")}


def cost_table(summary: dict[str, dict[str, Any]]) -> str:
    """What each method paid: its ρ schedule, fresh (two-pass), reuse and plain (one-pass)
    steps per run, and forward–backward passes per step ("" when no run counted its steps)."""
    if not any(r.get("step_counts") for r in summary.values()):
        return ""
    lines = [
        "What each run paid (mean per run; fresh: a two-pass step, reuse: one pass with a stored "
        'perturbation, plain: the base optimizer\'s one-pass step; "–": the run predates step '
        "counting):\n",
        "| method | ρ schedule | fresh | reuse | plain | passes per step |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in summary.items():
        c = r.get("step_counts")
        counts = (
            [f"{c[k]:.1f}".removesuffix(".0") for k in ("fresh", "reuse", "plain")]
            if c
            else ["–"] * 3
        )
        lines.append(
            f"| {method} | {r.get('rho_schedule', 'constant')} | {' | '.join(counts)} "
            f"| {_num(r.get('passes_per_step'), '.3f')} |"
        )
    return "\n".join(lines) + "\n"


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


def markdown_table(
    summary: dict[str, dict[str, Any]],
    incomplete: list[dict[str, Any]] | None = None,
    timing: dict[str, Any] | None = None,
) -> str:
    """Mean ± std per method over its completed runs; the final top Hessian eigenvalue when the
    runs computed it. Step times: measured alone (the probe) when ``timing`` has it, else the
    runs' own, headed as contended when runs shared the device."""
    incomplete = incomplete or []
    timing = timing or {}
    lam = any(r.get("lambda_max") is not None for r in summary.values())
    probe = (timing.get("probe") or {}).get("ms_per_step") or {}
    jobs = timing.get("jobs") or 1
    if probe:
        time_cols = ["ms/step alone", "vs AdamW alone (rough)", f"ms/step in sweep ({jobs} jobs)"]
    elif jobs > 1:
        time_cols = [f"ms/step ({jobs} jobs sharing)", "vs AdamW (contended)"]
    else:
        time_cols = ["ms/step", "vs AdamW (rough)"]
    cols = ["method", "seeds", "val loss", "val ppl", "test loss", "test ppl", *time_cols]
    cols += ["train time (s)", "skipped"] + (["λ_max(H)"] if lam else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base_probe = probe.get(BASELINE)
    for method, r in summary.items():
        seeds = _seeds_cell(len(r["seeds"]), _status_counts(incomplete, method))
        sweep = f"{1000 * r['time_per_step_s']:.1f}"
        if probe:
            ms = probe.get(method)
            rel = f"{ms / base_probe:.2f}x" if ms and base_probe else "-"
            times = [_num(ms, ".1f"), rel, sweep]
        else:
            times = [sweep, f"{r['time_vs_adamw']:.2f}x" if r["time_vs_adamw"] else "-"]
        cells = [
            method,
            seeds,
            _mean_std_cell(r, "val_loss", ".4f"),
            _mean_std_cell(r, "val_ppl", ".2f"),
            _mean_std_cell(r, "test_loss", ".4f"),
            _mean_std_cell(r, "test_ppl", ".2f"),
            *times,
            f"{r['train_time_s']:.1f}",
            str(r["skipped_steps"]),
        ] + ([_num(r.get("lambda_max"), ".4g")] if lam else [])
        lines.append("| " + " | ".join(cells) + " |")
    for method in dict.fromkeys(r["method"] for r in incomplete):
        if method not in summary:  # no completed run at all: a row that says so
            seeds = _seeds_cell(0, _status_counts(incomplete, method))
            lines.append("| " + " | ".join([method, seeds] + ["–"] * (len(cols) - 2)) + " |")
    return "\n".join(lines) + "\n"


def _mean_std_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """ "mean ± std" over a method's seeds; the mean alone for one seed (no spread to show)."""
    if len(row["seeds"]) < 2:
        return f"{row[key]:{fmt}}"
    return f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}"


def incomplete_table(incomplete: list[dict[str, Any]]) -> str:
    """The runs that did not complete, and how the tables treat them ("" when there are none)."""
    if not incomplete:
        return ""
    lines = [
        f"**{len(incomplete)} run{'s' if len(incomplete) > 1 else ''} did not complete** and "
        "are in none of the means, intervals, verdicts or mean curves above (they are counted "
        "beside their method's seeds, and drawn dashed per seed): each method's figures rest on "
        "its completed seeds only. Diverged or failed runs are outcomes, kept by `--resume`; "
        "interrupted ones continue with `flatlm compare --resume`.",
        "",
        "| run | status | step | reason |",
        "|---|---|---|---|",
    ]
    for r in incomplete:
        step = f"{r['step'] if r['step'] is not None else '?'}/{r['steps'] or '?'}"
        reason = (r["reason"] or "-").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['run']} | {r['status']} | {step} | {reason} |")
    return "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(d: dict[str, Any], low: str = "t_low", high: str = "t_high") -> str:
    if d[low] is None:
        return "n/a"
    return f"[{d[low]:+.4f}, {d[high]:+.4f}]"


def verdict_table(
    deltas: dict[str, dict[str, Any]],
    baseline: str = BASELINE,
    incomplete: list[dict[str, Any]] | None = None,
) -> str:
    """Δ = method − AdamW per seed, mean and 95% interval, and the verdict; says so with 1 seed.
    A method with runs that did not complete says so beside its verdict (which covers only its
    completed seeds); one with no completed run gets a row without numbers."""
    incomplete = incomplete or []
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
        verdict = "baseline" if method == baseline else d["verdict"]
        counts = _status_counts(incomplete, method)
        if counts:
            what = ", ".join(f"{k} {status}" for status, k in counts.items())
            verdict += f" (completed seeds only; {what} excluded)"
        cells.append(verdict)
        lines.append("| " + " | ".join(cells) + " |")
    for method in dict.fromkeys(r["method"] for r in incomplete):
        if method not in deltas and method != baseline:
            what = ", ".join(f"{k} {s}" for s, k in _status_counts(incomplete, method).items())
            cells = (
                [method, "0"] + ["–"] * (len(cols) - 3) + [f"no verdict: no completed run ({what})"]
            )
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


def timing_note(meta: dict[str, Any], probe: dict[str, Any] | None = None) -> str:
    """Where the step times come from: runs alone, or runs sharing the device (then also the
    probe that timed each method alone, if there is one)."""
    jobs, device = meta.get("jobs"), meta.get("device", "cpu")
    if jobs is None:
        return ""
    return _timing_source(jobs, device, probe) + ROUGH_TIMES


# Why no step time of a comparison is a cost measure, whatever its source.
ROUGH_TIMES = (
    "These step times are rough: a few steps each, contended by whatever else runs on the "
    "machine (a busy machine moves the ratios by tenths); measure a method's cost with "
    "`benchmarks/overhead.py` (docs/results.md).\n"
)


def _timing_source(jobs: int, device: str, probe: dict[str, Any] | None) -> str:
    if jobs > 1 and probe:
        return (
            f"Timing: {jobs} runs shared the {device} device at a time (`--jobs {jobs}`), so the "
            f"runs' own step times (ms/step in sweep) include contention and are no cost measure. "
            f"ms/step alone and vs AdamW alone come from a probe after the sweep: each method "
            f"timed alone for {probe.get('steps')} steps after a warm-up step, "
            f"{probe.get('rounds')} rounds interleaving the methods, the median, with "
            f"{probe.get('threads')} torch thread(s) on {probe.get('device', device)} "
            f"(`{PROBE_FILE}`).\n"
        )
    if jobs > 1:
        return (
            f"Timing: {jobs} runs shared the {device} device at a time (`--jobs {jobs}`), so "
            "ms/step includes contention and the ratios are noisy (no probe timed the methods "
            "alone); rerun one method with `--jobs 1` for clean step times.\n"
        )
    return f"Timing: one run at a time on {device} (`--jobs 1`).\n"


# ----------------------------------------------------------------------------- the report


def write_report(out_dir: str | Path) -> dict[str, Any]:
    """(Re)build ``results.md``, ``results.json`` and the plots from the run dirs in ``out_dir``;
    returns the ``summary``, the ``table`` text, the ``plots`` and every file written
    (``files``)."""
    out = Path(out_dir)
    if not (out / RUNS).is_dir():
        if (out / "result.json").is_file():
            return run_report(out)
        raise FileNotFoundError(
            f"{out} is neither a comparison folder (no '{RUNS}/' inside) nor a finished run "
            "(no result.json)"
        )
    meta_path = out / "compare.json"
    meta = read_record(meta_path) if meta_path.is_file() else {}
    # A tuned comparison (flatlm tune) runs each method at its own settings, by design.
    selecting = meta.get("config") and not meta.get("per_method_settings")
    other = other_setting_runs(out, meta["config"]) if selecting else []
    runs = collect_runs(out, skip={r["run"] for r in other})
    if not any(r["status"] != "no result" for r in runs):
        left_out = f" ({len(other)} left out for other settings)" if other else ""
        raise FileNotFoundError(f"no finished runs (runs/*/result.json) in {out}{left_out}")
    probe_path = out / PROBE_FILE
    probe = read_record(probe_path) if probe_path.is_file() else None
    known = meta.get("methods") or []
    methods = known + sorted({r["method"] for r in runs} - set(known))
    summary = summarize(runs, methods)
    incomplete = incomplete_runs(runs)
    for method, row in summary.items():
        row["incomplete"] = _status_counts(incomplete, method)
    deltas = paired_deltas(runs, list(summary))
    reg = regime(summary)
    timing = {"jobs": meta.get("jobs"), "device": meta.get("device")}
    timing["shared_device"] = (meta.get("jobs") or 1) > 1
    timing["threads"] = meta.get("threads")
    timing["probe"] = probe
    note = timing_note(meta, probe)
    costs, cost_source = step_costs(summary, probe)
    points = cost_quality(deltas, costs) if BASELINE in summary else []
    table = (
        markdown_table(summary, incomplete, timing)
        + ("\n" + incomplete_table(incomplete) if incomplete else "")
        + ("\n" + other_settings_note(other) if other else "")
        + "\n"
        + verdict_table(deltas, BASELINE, incomplete)
        + "\n"
        + regime_table(summary, reg)
        + ("\n" + cost_table(summary) if cost_table(summary) else "")
        + ("\n" + cost_quality_table(points, cost_source) if len(points) > 1 else "")
        + ("\n" + note if note else "")
    )
    plots = plot_curves(runs, methods, out) + plot_deltas(deltas, out, BASELINE)
    plots += plot_sharpness(runs, methods, out)
    plots += plot_cost_quality(points, out / "cost_quality.png", BASELINE)
    seeds = sorted({r["seed"] for r in runs if r.get("seed") is not None})
    text = (
        f"# flatlm comparison\n\nMean ± std over seeds {seeds} (completed runs only); losses are "
        "nats/token on the fixed validation/test windows; time per step is training time only "
        "(no evaluation).\n\n" + table + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    )
    atomic_write_text(out / "results.md", text)
    results = {"summary": summary, "deltas_vs_adamw": deltas, "regime": reg}
    results["cost_quality"] = {"points": points, "cost_source": cost_source}
    results |= {"incomplete": incomplete, "runs": runs, "seeds": seeds, "methods": methods}
    results["other_settings"] = other
    results["timing"] = timing
    results["config"] = meta.get("config")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    files = [out / "results.md", out / "results.json", *plots]
    return {
        "summary": summary,
        "table": table,
        "plots": [str(p) for p in plots],
        "files": [str(p) for p in files],
    }


def run_report(folder: str | Path) -> dict[str, Any]:
    """One run folder's figures as the comparison table's row (and its regime), printed only:
    nothing is written into the run's folder (``files`` is empty)."""
    folder = Path(folder)
    run = read_record(folder / "result.json")
    summary = summarize([run], [run["method"]])
    incomplete = incomplete_runs([run | {"run_dir": folder.name}])
    table = markdown_table(summary, incomplete) + (
        "\n" + incomplete_table(incomplete) if incomplete else ""
    )
    if summary:
        table += "\n" + regime_table(summary, regime(summary, run["method"]))
    head = f"Run {folder}: {run['method']} seed {run.get('seed')}, step {run.get('step')}"
    return {"summary": summary, "table": f"{head}\n\n{table}", "plots": [], "files": []}
