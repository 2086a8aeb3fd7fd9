"""Run one config under several methods and seeds, then tabulate and plot the results.

A comparison folder holds ``runs/<method>-s<seed>/`` (each a normal training run dir) plus
``results.md``, ``results.json`` and PNG plots; :func:`write_report` rebuilds the latter from the
run dirs alone, so ``flatlm report DIR`` works on any finished (or partly finished) comparison.

The report's verdicts come from :mod:`flatlm.lm.stats`: each method minus AdamW paired by seed,
with a 95% interval, and the regime (epochs, train-validation gap) the comparison ran in.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
from pathlib import Path
from typing import Any

from flatlm.lm import stats
from flatlm.lm.config import RunConfig, config_from_dict
from flatlm.lm.data import prepare_corpus
from flatlm.lm.train import train

RUNS = "runs"
BASELINE = "adamw"  # every verdict is "this method vs AdamW at the same seeds"


def run_dir(out: Path, method: str, seed: int) -> Path:
    """``gasam:alpha=-1`` runs in ``gasam_alpha=-1-s0`` (no ':' or ',' in folder names)."""
    return out / RUNS / f"{re.sub(r'[^A-Za-z0-9_.=+-]', '_', method)}-s{seed}"


_STOP: Any = None  # in workers: the parent's "stop" event (set on Ctrl-C)


def _init_worker(stop: Any) -> None:
    """Workers ignore Ctrl-C between runs; during a run ``train`` handles it (checkpoint, return)."""
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(task: tuple[dict[str, Any], str, bool, bool]) -> dict[str, Any]:
    """Worker: one training run (module-level so ``spawn`` processes can pickle it)."""
    cfg_dict, out, quiet, resume = task
    if _STOP is not None and _STOP.is_set():
        return {"status": "not started"}
    cfg = config_from_dict(cfg_dict)
    out_path = Path(out)
    if resume:
        _check_same_run(out_path, cfg_dict)
    result = _result(out_path) if resume else {}
    if result.get("status") == "completed" and result["steps"] == cfg.train.steps:
        return result
    resume = resume and (out_path / "checkpoint.pt").is_file()
    return train(cfg, out_path, resume=resume, quiet=quiet)


# Settings that do not change what a run computes: a resumed comparison may differ in these.
_RESUME_FREE = {("train", "threads"), ("train", "log_every"), ("train", "checkpoint_every")}


def _check_same_run(out: Path, wanted: dict[str, Any]) -> None:
    """Refuse to resume (or reuse) a run made with other settings, naming them: otherwise a
    changed config under ``--resume`` would silently keep the old runs."""
    path = out / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = [
        f"{section}.{key} = {saved.get(section, {}).get(key)!r} there, {value!r} now"
        for section, values in wanted.items()
        if section != "compare"
        for key, value in values.items()
        if (section, key) not in _RESUME_FREE and saved.get(section, {}).get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"cannot resume {out}: it was run with other settings ({'; '.join(diffs)}); "
            "use another --out, or drop --resume to start the comparison afresh"
        )


def compare(
    cfg: RunConfig,
    out_dir: str | Path,
    methods: list[str],
    seeds: list[int],
    *,
    jobs: int = 1,
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every (method, seed) with otherwise identical settings; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_corpus(cfg.data)  # tokenise once here, so parallel workers only read the cache
    # Under torchrun every rank runs this loop, one distributed run at a time; rank 0 writes.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        jobs = 1
    jobs = max(1, min(jobs, len(methods) * len(seeds)))
    tasks = []
    for method in methods:
        for seed in seeds:
            c = copy.deepcopy(cfg)
            c.optim.method, c.train.seed = method, seed
            if c.train.threads == 0:  # share the cores instead of oversubscribing them
                c.train.threads = max(1, (os.cpu_count() or 1) // jobs)
            tasks.append((c.to_dict(), str(run_dir(out, method, seed)), quiet or jobs > 1, resume))
    # Longest first (sharpness-aware steps cost two passes): better packing across workers.
    tasks.sort(key=lambda t: t[0]["optim"]["method"] == "adamw")
    # jobs > 1: the runs shared the cores (or the GPU), which the report says beside step times.
    meta = {"methods": methods, "seeds": seeds, "jobs": jobs, "device": cfg.train.device}
    if main_rank:
        (out / "compare.json").write_text(json.dumps(meta | {"config": cfg.to_dict()}, indent=1))
    if jobs == 1:
        for t in tasks:
            if _run(t)["status"] != "completed":  # Ctrl-C: train checkpointed; stop here
                break
    else:
        _run_pool(tasks, jobs)
    if not main_rank:  # rank 0 writes the runs' results and the report
        return {"summary": {}, "table": "", "plots": [], "missing": []}
    missing = [t[1] for t in tasks if _result(Path(t[1])).get("status") != "completed"]
    if len(missing) == len(tasks):
        return {"summary": {}, "table": "", "plots": [], "missing": missing}
    return write_report(out) | {"missing": missing}


def _result(run: Path) -> dict[str, Any]:
    """A run dir's ``result.json`` ({} before the run has ended once)."""
    path = run / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_pool(tasks: list[tuple[dict[str, Any], str, bool, bool]], jobs: int) -> None:
    """Runs in ``jobs`` spawned processes; the first Ctrl-C lets running runs checkpoint and
    starts no new ones, a second one terminates the workers."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(stop,))
    try:
        for _ in pool.imap_unordered(_run, tasks):
            pass
        pool.close()  # let workers exit on their own (no leaked semaphores)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- report


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


def plot_curves(runs: list[dict[str, Any]], methods: list[str], out: Path) -> list[Path]:
    """``val_loss.png`` (mean ± std per method) and ``val_loss_by_seed.png`` (a panel per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in methods if any(r["method"] == m and r["val_curve"] for r in runs)]
    if not methods:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        curves = [r["val_curve"] for r in runs if r["method"] == method and r["val_curve"]]
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        losses = np.array([[v for _, v in c[:n]] for c in curves])
        # the sample std (ddof=1), as in the tables; one seed draws no band
        mean = losses.mean(0)
        std = losses.std(0, ddof=1) if len(losses) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, label=f"{method} (n={len(curves)})")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "val_loss.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        for r in sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"]):
            if r["val_curve"]:
                s, v = zip(*r["val_curve"], strict=True)
                ax.plot(s, v, label=f"seed {r['seed']}")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.supxlabel("step")
    fig.supylabel("validation loss")
    fig.tight_layout()
    paths.append(out / "val_loss_by_seed.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def plot_deltas(
    deltas: dict[str, dict[str, Any]], out: Path, baseline: str = BASELINE
) -> list[Path]:
    """``delta_vs_adamw.png``: mean Δ val/test loss per method with its 95% t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in deltas if m != baseline]
    if not methods:
        return []
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(methods) + 2), 4))
    for k, (split, color) in enumerate((("val", "C0"), ("test", "C1"))):
        for i, method in enumerate(methods):
            d = deltas[method][split]
            x = i + (k - 0.5) * 0.25
            if d["t_low"] is not None:
                err = [[d["mean"] - d["t_low"]], [d["t_high"] - d["mean"]]]
                ax.errorbar(x, d["mean"], yerr=err, fmt="o", color=color, capsize=4)
            else:
                ax.plot(x, d["mean"], "x", color=color)
            ax.plot(
                [x] * d["n"], d["diffs"], ".", color=color, alpha=0.4,
                label=None if i else f"{split} (dots: seeds)",
            )  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    n = max(deltas[m]["val"]["n"] for m in methods)
    title = f"Δ loss vs {baseline}, paired by seed (n={n})"
    ax.set(
        ylabel=f"loss − {baseline} loss (nats/token)",
        title=title + (", 95% t-interval" if n > 1 else ", no interval"),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "delta_vs_adamw.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_sharpness(runs: list[dict[str, Any]], methods: list[str], out: Path) -> list[Path]:
    """``sharpness.png``: λ_max(H) and the logit/functional ratio over training, mean per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [
        m for m in methods if any(r["method"] == m and r.get("sharpness_curve") for r in runs)
    ]
    if not methods:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        curves = [
            r["sharpness_curve"] for r in runs if r["method"] == method and r.get("sharpness_curve")
        ]
        n = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:n]]
        for ax, col in zip(axes, (1, 2), strict=True):
            ys = np.array(
                [[np.nan if c[i][col] is None else c[i][col] for i in range(n)] for c in curves]
            )
            ax.plot(steps, np.nanmean(ys, axis=0), marker=".", label=f"{method} (n={len(curves)})")
    axes[0].set(
        xlabel="step", ylabel="λ_max(H) (Lanczos lower bound)", title="Top Hessian eigenvalue"
    )
    axes[1].set(
        xlabel="step", ylabel="‖logit path‖ / ‖functional path‖", title="SAM logit/functional ratio"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sharpness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


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
    plots = plot_curves(runs, methods, out) + plot_deltas(deltas, out)
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
