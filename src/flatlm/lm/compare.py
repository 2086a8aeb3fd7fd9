"""Run one config under several methods and seeds, then tabulate and plot the results.

A comparison folder holds ``runs/<method>-s<seed>/`` (each a normal training run dir) plus
``results.md``, ``results.json`` and PNG plots; :func:`write_report` rebuilds the latter from the
run dirs alone, so ``flatlm report DIR`` works on any finished (or partly finished) comparison.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import signal
import statistics
from pathlib import Path
from typing import Any

from flatlm.lm.config import RunConfig, config_from_dict
from flatlm.lm.data import prepare_corpus
from flatlm.lm.train import train

RUNS = "runs"


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / RUNS / f"{method}-s{seed}"


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
    result = _result(out_path) if resume else {}
    if result.get("status") == "completed" and result["steps"] == cfg.train.steps:
        return result
    resume = resume and (out_path / "checkpoint.pt").is_file()
    return train(cfg, out_path, resume=resume, quiet=quiet)


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
    (out / "compare.json").write_text(
        json.dumps({"methods": methods, "seeds": seeds, "config": cfg.to_dict()}, indent=1)
    )
    if jobs == 1:
        for t in tasks:
            if _run(t)["status"] != "completed":  # Ctrl-C: train checkpointed; stop here
                break
    else:
        _run_pool(tasks, jobs)
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
        summary[method] = row
    base = summary.get("adamw", {}).get("time_per_step_s")
    for row in summary.values():
        row["time_vs_adamw"] = row["time_per_step_s"] / base if base else None
    return summary


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    head = (
        "| method | seeds | val loss | val ppl | test loss | test ppl | ms/step | vs AdamW "
        "| train time (s) | skipped |\n|---|---|---|---|---|---|---|---|---|---|\n"
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
            f"| {r['skipped_steps']} |"
        )
    return head + "\n".join(lines) + "\n"


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
        mean, std = losses.mean(0), losses.std(0)
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
    table = markdown_table(summary)
    plots = plot_curves(runs, methods, out)
    seeds = sorted({r["seed"] for r in runs})
    text = (
        f"# flatlm comparison\n\nMean ± std over seeds {seeds}; losses are nats/token on the fixed "
        "validation/test windows; time per step is training time only (no evaluation).\n\n"
        + table
        + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    )
    (out / "results.md").write_text(text)
    results = {"summary": summary, "runs": runs, "seeds": seeds, "methods": methods}
    results["config"] = meta.get("config")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return {"summary": summary, "table": table, "plots": [str(p) for p in plots]}
