"""The papers' protocol at a scale this machine runs: ρ tuned per method, then 3 seeds, one report.

Functional-SAM's claim (SAM no better than AdamW on language models; Functional-SAM and the
preconditioned variants better, preconditioned Functional-SAM best and flattest) only means
something when every method gets its own best radius, so the protocol is:

1. for every sharpness-aware method, train seed 0 at each ρ of a small grid;
2. pick each method's ρ by *validation* loss (never test);
3. train seeds 1 and 2 at the chosen ρ (AdamW simply runs every seed);
4. report test loss (the later 1996–2021 split, untouched by the choice) as the headline, the
   difference to AdamW paired by seed with its 95 % t-interval and verdict (flatlm.lm.stats),
   and the final top Hessian eigenvalue λ_max (``train.sharpness_final``).

Two parts: the workbench GPT at two sizes with adamw, sam, fsam, psam, pfsam, and the GA-SAM
setting (a micro LSTM LM, docs/experiments/gasam_lstm.toml) with adamw, sam, gasam; either part
takes other methods or variants (``--lstm-methods adamw sam gasam:alpha=1 ...``), each tuned
over the same grid.

    python benchmarks/reproduce.py --profile cpu --jobs 2        # ≈ 20-45 min on a 2-core CPU
    python benchmarks/reproduce.py --profile gpu                 # GPT small/medium on CUDA
    python benchmarks/reproduce.py --resume                      # continue a killed study

Tuning, training and statistics are flatlm's own: each part is one ``flatlm compare --tune
--sampler grid --param optim.rho=<grid>`` (:mod:`flatlm.lm.tune`, a study in ``<out>/<part>/``
whose best trial per method is the chosen ρ); this script only builds the parts' configs,
gathers their results and writes ``<out>/report.md``, ``<out>/report.json`` and PNG plots.
Running it again continues the studies (``--resume`` is kept for old command lines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlm.lm import study as st
from flatlm.lm.compare import probe_step_times
from flatlm.lm.config import RunConfig, load_config, parse_override
from flatlm.lm.models import GPT_SIZES
from flatlm.lm.plots import plot_cost_quality, plot_curves
from flatlm.lm.report import (
    BASELINE,
    PROBE_FILE,
    collect_runs,
    cost_quality,
    cost_quality_table,
    final_lambda_max,
    paired_deltas,
    regime,
    step_costs,
    summarize,
)
from flatlm.lm.tune import make_job
from flatlm.lm.tune import run as run_study
from flatlm.optim import parse_method

REPO = Path(__file__).resolve().parent.parent
GASAM_LSTM = REPO / "docs" / "experiments" / "gasam_lstm.toml"

GPT_METHODS = ("adamw", "sam", "fsam", "psam", "pfsam")
LSTM_METHODS = ("adamw", "sam", "gasam")
GPT_GRID = (0.02, 0.1, 0.5)
LSTM_GRID = (0.05, 0.2, 1.0)
GROUP = "reproduce"  # the study group of each part's folder (flatlm.lm.study)


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the CPU and the GPU study.

    CPU: steps chosen from measured single runs (one thread, idle machine: micro GPT ≈ 40/70 ms
    per AdamW/SAM step, tiny ≈ 75/135 ms, micro LSTM ≈ 45/90 ms, plus ≈ 5 s per run for
    evaluation and the final λ_max) so the 59 runs take ≈ 20 min on two free cores and stay under
    45 min when other jobs take up to half of the machine.
    """

    device: str
    gpt_sizes: tuple[str, ...]
    jobs: int
    gpt: dict[str, Any]  # overrides on top of ``gpt_preset``
    gpt_preset: str
    lstm: dict[str, Any]  # overrides on top of the LSTM base (a preset or a config file)
    lstm_preset: str | None = None  # None: docs/experiments/gasam_lstm.toml
    common: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "cpu": Profile(
        device="cpu",
        gpt_sizes=("micro", "tiny"),
        jobs=2,
        gpt_preset="quick",  # BPE 2048, context 64, lr 3e-3, one thread per run
        gpt={
            "train.steps": 300,  # 0.13 epochs: the distribution-shift regime
            "train.batch_size": 16,
            "train.warmup_steps": 30,
            "train.eval_every": 50,
        },
        lstm={"train.steps": 600, "train.threads": 1},
        common={"train.sharpness_batches": 1, "train.sharpness_iters": 10},
    ),
    "gpu": Profile(
        device="cuda",
        gpt_sizes=("small", "medium"),
        jobs=4,
        gpt_preset="paper",  # BPE 8192, context 128, lr 1e-3
        # The paper preset's 2000 x 6 x 128 = 1.5 M tokens: under one epoch of the training
        # split, the distribution-shift regime the Functional-SAM paper's ordering is about.
        gpt={"train.steps": 2000, "train.eval_every": 200, "train.threads": 0},
        lstm_preset="lstm",  # GA-SAM's own setting: 2 x 512 LSTM, BPE 4096
        # 1500 x 16 x 64 = 1.5 M tokens, under one epoch as well (the preset's batch 32 is not).
        lstm={"train.batch_size": 16, "train.threads": 0},
        common={"train.sharpness_batches": 2, "train.sharpness_iters": 10},
    ),
}


@dataclass
class Part:
    """One model of the study: a comparison folder, its methods and its ρ grid."""

    name: str  # folder name under --out, e.g. "gpt-micro"
    title: str
    cfg: RunConfig
    methods: tuple[str, ...]  # base names, BASELINE first
    grid: tuple[float, ...]


# ----------------------------------------------------------------------------- configs


def method_spec(method: str, rho: float | None) -> str:
    """``sam`` at ρ = 0.1 -> ``sam:rho=0.1``, ``gasam:alpha=1`` -> ``gasam:alpha=1,rho=0.1``
    (the radius travels in the method name; a method may be a variant with options)."""
    if method == BASELINE or rho is None:
        return method
    return f"{method}{',' if ':' in method else ':'}rho={rho:g}"


def spec_rho(spec: str) -> tuple[str, float | None]:
    """``gasam:alpha=1,rho=0.1`` -> ("gasam:alpha=1", 0.1); the inverse of :func:`method_spec`."""
    name, _, rest = spec.partition(":")
    items = [item.strip() for item in rest.split(",") if item.strip()]
    kept = [item for item in items if item.partition("=")[0].strip() != "rho"]
    rho = parse_method(spec)[1].get("rho")
    method = name.strip() + (":" + ",".join(kept) if kept else "")
    return method, None if rho is None else float(rho)


def build_parts(args: argparse.Namespace) -> list[Part]:
    """The base config of every part (method and seed are set per run by ``compare``)."""
    prof = PROFILES[args.profile]
    device = args.device or prof.device
    user = dict(parse_override(item) for item in args.set or [])
    parts: list[Part] = []

    def overrides(specific: dict[str, Any], methods: tuple[str, ...]) -> dict[str, Any]:
        items: dict[str, Any] = {
            **prof.common,
            **specific,
            "train.device": device,
            "train.sharpness_final": True,  # λ_max(H) once at the end, into result.json
            "optim.rho": None,  # ρ is always named in the method spec
            "compare.methods": list(methods),
            "compare.seeds": list(args.seeds),
            "compare.jobs": args.jobs or prof.jobs,
        }
        if args.steps is not None:
            items["train.steps"] = args.steps
        return items | user

    if "gpt" in args.parts:
        for size in args.sizes or prof.gpt_sizes:
            gpt = tuple(args.gpt_methods)
            items = overrides({**prof.gpt, "model.arch": "gpt", "model.size": size}, gpt)
            cfg = load_config(preset=prof.gpt_preset, overrides=items)
            parts.append(Part(f"gpt-{size}", f"GPT {size}", cfg, gpt, tuple(args.grid)))
    if "lstm" in args.parts:
        lstm = tuple(args.lstm_methods)
        items = overrides(prof.lstm, lstm)
        path = None if prof.lstm_preset else GASAM_LSTM
        cfg = load_config(preset=prof.lstm_preset, path=path, overrides=items)
        title = f"LSTM {cfg.model.size} (GA-SAM setting)"
        parts.append(Part("lstm", title, cfg, lstm, tuple(args.lstm_grid)))
    return parts


# ----------------------------------------------------------------------------- running


def _trained(folder: Path) -> set[tuple[str, int]]:
    """The finished trials of the part's study that trained a run (not the reused seed-0 run
    of a tuned method): (study, number)."""
    if not (folder / st.JOURNAL).is_file():
        return set()
    recs = st.records(st.open_storage(None, folder), GROUP)
    return {
        (name, r["number"]) for name, rows in recs.items() for r in rows if r["kind"] != "reuse"
    }


def run_part(part: Part, out: Path, args: argparse.Namespace, jobs: int) -> dict[str, Any]:
    """``flatlm compare --tune --sampler grid`` on the part (flatlm.lm.tune): each method's
    grid at the first seed, its ρ by validation loss, then every seed at the chosen ρ."""
    folder = out / part.name
    before = _trained(folder)
    t0 = time.perf_counter()
    grid = ",".join(f"{rho:g}" for rho in part.grid)
    job = make_job(
        part.cfg,
        folder,
        list(part.methods),
        [f"optim.rho={grid}"],
        sampler="grid",
        pruner="none",
        final_seeds=list(args.seeds),
        study=GROUP,
        quiet=args.quiet or jobs > 1,
        jobs=jobs,
    )
    print(f"[{part.name}] {' '.join(part.methods)}: ρ grid {grid} at seed {args.seeds[0]}, "
          f"then seeds {args.seeds}", flush=True)  # fmt: skip
    report = run_study(job, jobs=jobs)
    if report["stopped"]:
        raise RuntimeError(f"[{part.name}] stopped: run the same command again to continue")
    choice = tuning_choice(folder, part)
    after = _trained(folder)
    counts = {"trained": len(after - before), "reused": len(after & before), "missing": 0}
    print(
        f"[{part.name}] done in {time.perf_counter() - t0:.0f} s: {counts}; chosen ρ (seed "
        f"{args.seeds[0]} validation): "
        + ", ".join(f"{m}={c['chosen_rho']:g}" for m, c in choice.items()),
        flush=True,
    )
    if args.probe:
        print(f"[{part.name}] timing the chosen methods alone for the cost axis", flush=True)
        timing = probe_step_times(part.cfg, final_specs(part, choice))
        (folder / PROBE_FILE).write_text(json.dumps(timing, indent=1))
    return {"choice": choice, "counts": counts}


def tuning_choice(folder: Path, part: Part) -> dict[str, dict[str, Any]]:
    """Each tuned method's grid as the study recorded it (``tune.json``): the validation loss at
    each ρ, the chosen ρ (the study's best trial) and the method spec it names."""
    methods = json.loads((folder / "tune.json").read_text())["methods"]
    out: dict[str, dict[str, Any]] = {}
    for method, data in methods.items():
        by_rho: dict[str, float | None] = {f"{rho:g}": None for rho in part.grid}
        for t in data["trials"]:
            if t["state"] == "COMPLETE":
                by_rho[f"{t['params']['optim.rho']:g}"] = t["value"]
        chosen = data["best"]["params"]["optim.rho"] if data["best"] else None
        out[method] = {
            "val_loss_by_rho": by_rho,
            "chosen_rho": chosen,
            "spec": method_spec(method, chosen) if chosen is not None else None,
        }
    return out


def final_specs(part: Part, choice: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """AdamW plus every other method at its chosen ρ, in the part's method order."""
    return [BASELINE if m == BASELINE else choice[m]["spec"] for m in part.methods]


def _runs(
    folder: Path, part: Part, choice: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The comparison's runs (``runs/``, one per method and seed), each named by its spec."""
    if not (folder / "runs").is_dir():
        return []
    runs = [r for r in collect_runs(folder) if r.get("steps") == part.cfg.train.steps]
    for r in runs:
        if r["method"] in choice:
            r["method"] = choice[r["method"]]["spec"]
    return runs


# ----------------------------------------------------------------------------- summary


def summarize_part(
    part: Part, folder: Path, choice: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]
) -> dict[str, Any]:
    """Per method at its chosen ρ: losses over the seeds, λ_max, and Δ vs AdamW (flatlm.lm.stats)."""
    specs = final_specs(part, choice)
    runs = [r for r in _runs(folder, part, choice) if r["seed"] in seeds and r["method"] in specs]
    summary = summarize(runs, specs)
    deltas = paired_deltas(runs, specs)
    rows: dict[str, dict[str, Any]] = {}
    for method, spec in zip(part.methods, specs, strict=True):
        if spec not in summary:
            continue
        row = summary[spec]
        done = [r for r in runs if r["method"] == spec and r["status"] == "completed"]
        lam = [final_lambda_max(r) for r in sorted(done, key=lambda r: r["seed"])]
        d = deltas.get(spec)
        rows[method] = {
            "spec": spec,
            "rho": spec_rho(spec)[1],
            "seeds": row["seeds"],
            "val_loss": row["val_loss"],
            "val_loss_std": row["val_loss_std"],
            "test_loss": row["test_loss"],
            "test_loss_std": row["test_loss_std"],
            "test_loss_by_seed": {r["seed"]: r["test_loss"] for r in done},
            "lambda_max": row["lambda_max"],
            "lambda_max_std": row["lambda_max_std"],
            "lambda_max_by_seed": dict(zip(sorted(r["seed"] for r in done), lam, strict=True)),
            "time_per_step_ms": 1000 * row["time_per_step_s"],
            "time_vs_adamw": row["time_vs_adamw"],
            "skipped_steps": row["skipped_steps"],
            "epochs": row["epochs"],
            "train_loss": row["train_loss"],
            "delta_val_vs_adamw": d["val"] if d else None,
            "delta_test_vs_adamw": d["test"] if d else None,
            "verdict_test": d["test"]["verdict"] if d else None,
            "verdict_val_and_test": d["verdict"] if d else None,
        }
    # Cost–quality: step times from the probe that timed the final specs alone (compare writes
    # it after the last phase's sweep when runs shared the machine), else the runs' own.
    probe_path = folder / PROBE_FILE
    probe = json.loads(probe_path.read_text()) if probe_path.is_file() else None
    costs, cost_source = step_costs(summary, probe)
    label = {spec: method for method, spec in zip(part.methods, specs, strict=True)}
    points = cost_quality(
        {label[s]: d for s, d in deltas.items() if s in label},
        {label[s]: c for s, c in costs.items() if s in label},
    )
    first = next(iter(runs), {})
    return {
        "title": part.title,
        "folder": part.name,
        "arch": part.cfg.model.arch,
        "size": part.cfg.model.size,
        "params": first.get("params"),
        "vocab_size": first.get("vocab_size"),
        "steps": part.cfg.train.steps,
        "batch_size": part.cfg.train.batch_size,
        "block_size": part.cfg.model.block_size,
        "grid": list(part.grid),
        "tuning_seed": seeds[0],
        "tuning": dict(choice),
        "methods": rows,
        "regime": regime(summary),
        "cost_quality": {"points": points, "cost_source": cost_source},
        "val_curve_runs": runs,  # popped before report.json; the curves plot needs them
        "config": part.cfg.to_dict(),
    }


# ----------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str = ".4f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


def _pm(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    return "–" if mean is None else f"{_f(mean, fmt)} ± {_f(std, fmt)}"


def results_table(p: Mapping[str, Any]) -> str:
    """The headline table: chosen ρ, losses over seeds, Δ test vs AdamW, verdict, λ_max."""
    lines = [
        "| method | ρ | seeds | val loss | test loss | Δ test vs AdamW | 95 % t-interval "
        "| verdict (test) | λ_max(H) | ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in p["methods"].items():
        d = r["delta_test_vs_adamw"]
        base = method == BASELINE
        ci = (
            "–"
            if base or not d or d["t_low"] is None
            else f"[{d['t_low']:+.4f}, {d['t_high']:+.4f}]"
        )
        cells = [
            method,
            _f(r["rho"], "g"),
            ",".join(map(str, r["seeds"])),
            _pm(r["val_loss"], r["val_loss_std"]),
            _pm(r["test_loss"], r["test_loss_std"]),
            "–" if base or not d else f"{d['mean']:+.4f}",
            ci,
            "baseline" if base else (r["verdict_test"] or "–"),
            _pm(r["lambda_max"], r["lambda_max_std"], ".3g"),
            _f(r["time_per_step_ms"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tuning_table(p: Mapping[str, Any]) -> str:
    """Every grid point's validation loss at the tuning seed; the chosen one in bold."""
    grid = [f"{x:g}" for x in p["grid"]]
    lines = [
        "| method | " + " | ".join(f"ρ = {g}" for g in grid) + " | chosen ρ |",
        "|---|" + "---|" * (len(grid) + 1),
    ]
    adamw = p["methods"].get(BASELINE)
    for method, c in p["tuning"].items():
        cells = []
        for g in grid:
            v = c["val_loss_by_rho"].get(g)
            text = "not run" if v is None else _f(v)
            chosen = c["chosen_rho"] is not None and f"{c['chosen_rho']:g}" == g
            cells.append(f"**{text}**" if chosen else text)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_f(c['chosen_rho'], 'g')} |")
    note = ""
    if adamw is not None:
        seed0 = p["tuning_seed"]
        runs = [r for r in p["val_curve_runs"] if r["method"] == BASELINE and r["seed"] == seed0]
        if runs:
            note = f"\nAdamW (no ρ) at seed {seed0}: validation loss {runs[0]['val_loss']:.4f}.\n"
    return "\n".join(lines) + "\n" + note


def _part_header(p: Mapping[str, Any]) -> str:
    params = f"{p['params'] / 1e6:.2f} M parameters, " if p["params"] else ""
    vocab = f"vocabulary {p['vocab_size']}, " if p["vocab_size"] else ""
    epochs = p["regime"].get("epochs")
    return (
        f"{params}{vocab}{p['steps']} steps x batch {p['batch_size']} x context "
        f"{p['block_size']}" + (f" ({epochs:.2g} epochs of the training split)" if epochs else "")
    )


def machine_line(args: argparse.Namespace, parts: Sequence[Part], load: Sequence[float]) -> str:
    """Where the numbers came from: CPU, torch, threads per run, parallel runs, load."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = sorted({p.cfg.train.threads for p in parts})
    thr = ", ".join("torch default" if t == 0 else str(t) for t in threads)
    dev = parts[0].cfg.train.device if parts else args.device
    gpu = ""
    if dev.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs{gpu}; "
        f"torch {torch.__version__}; device {dev}; {thr} thread(s) per run, up to "
        f"{args.jobs or PROFILES[args.profile].jobs} runs at a time (--jobs); load average "
        f"{load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )


def write_report(
    out: Path,
    args: argparse.Namespace,
    parts: Sequence[Part],
    results: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """``report.md``, ``report.json`` and the plots from the parts finished so far."""
    plots = make_plots(out, results)
    done = [p for p in parts if p.name in results]
    seeds = list(args.seeds)
    md = [
        f"# Sharpness-aware methods at small scale: the papers' protocol ({args.profile} profile)\n",
        f"- Machine: {machine_line(args, done, meta['load_start'])}",
        f"- Command: `{meta['command']}`",
        f"- Wall time: {meta['wall_time_s'] / 60:.1f} min ({meta['wall_time_s']:.0f} s) for this "
        f"invocation; runs trained {meta['trained']}, reused from an earlier invocation "
        f"{meta['reused']}" + ("" if meta["complete"] else " — **incomplete: parts missing**"),
        "",
        f"Protocol: each sharpness-aware method trains seed {seeds[0]} at every ρ of its grid; "
        "its ρ is the one with the lowest validation loss (1970–1995 addresses); seeds "
        f"{', '.join(map(str, seeds[1:])) or '(none)'} then train at that ρ. AdamW runs every seed. "
        "All methods share steps, schedule, initialisation and data order per seed. Test loss "
        "(1996–2021, never used for a choice) is the headline. Δ = method − AdamW at the same "
        "seed, mean with a 95 % Student-t interval; verdict better/worse only when the whole "
        "interval is below/above 0 (`flatlm.lm.stats`). λ_max(H) is the top Hessian eigenvalue "
        "of the final weights on fixed training windows (Lanczos, a lower bound). Losses are "
        "nats/token, mean ± std over seeds. Caveat: seed "
        f"{seeds[0]} took part in choosing ρ, so the sharpness-aware methods' validation numbers "
        "are slightly optimistic; test is not selected on.",
        "",
    ]
    for p in (results[x.name] for x in done):
        md += [
            f"## {p['title']}\n",
            _part_header(p) + ".\n",
            results_table(p),
            f"**Regime:** {p['regime']['sentence']}\n",
            f"ρ tuning, validation loss at seed {p['tuning_seed']}:\n",
            tuning_table(p),
        ]
        cq = p.get("cost_quality")
        if cq and len(cq["points"]) > 1:
            md.append(cost_quality_table(cq["points"], cq["cost_source"]))
        md += [f"![{Path(x).stem}]({x})\n" for x in plots.get(p["folder"], [])]
    md += ["## Across parts\n"]
    md += [f"![{Path(x).stem}]({x})\n" for x in plots.get("all", [])]
    md += [
        "Per-part study folders (flatlm's own tune.md over the grid and results.md over the "
        "final runs; every trial's config, metrics and checkpoint under trials/): "
        + ", ".join(f"`{p.name}/`" for p in done)
        + ".\n"
    ]
    (out / "report.md").write_text("\n".join(md))
    data = {
        "profile": args.profile,
        "command": meta["command"],
        "machine": machine_line(args, done, meta["load_start"]),
        "wall_time_s": meta["wall_time_s"],
        "runs_trained": meta["trained"],
        "runs_reused": meta["reused"],
        "complete": meta["complete"],
        "seeds": seeds,
        "parts": {
            k: {kk: vv for kk, vv in v.items() if kk != "val_curve_runs"}
            for k, v in results.items()
        },
        "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(data, indent=1))
    return data


# ----------------------------------------------------------------------------- plots


def make_plots(out: Path, results: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Validation curves per part (flatlm's ``plot_curves``); test loss, λ_max and the ρ grid
    across parts. Paths are relative to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, list[str]] = {}
    for name, p in results.items():
        folder = out / "plots" / name
        folder.mkdir(parents=True, exist_ok=True)
        specs = [r["spec"] for r in p["methods"].values()]
        paths = plot_curves(p["val_curve_runs"], specs, folder)
        cq = p.get("cost_quality")
        if cq:
            paths += plot_cost_quality(
                cq["points"], folder / "cost_quality.png", BASELINE, f"{p['title']}: cost and gain"
            )
        plots[name] = [str(x.relative_to(out)) for x in paths]
    if not results:
        return plots
    across = []
    for key, ylabel, fname in (
        ("test_loss", "test loss (nats/token)", "test_loss.png"),
        ("lambda_max", "λ_max(H) of the final weights", "lambda_max.png"),
    ):
        fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
        for ax, p in zip(axes[0], results.values(), strict=True):
            rows = list(p["methods"].items())
            for i, (_, r) in enumerate(rows):
                by_seed = r[f"{key}_by_seed"]
                ys = [v for v in by_seed.values() if v is not None]
                if not ys:
                    continue
                ax.errorbar(i, r[key], yerr=r[f"{key}_std"], fmt="o", color=f"C{i}", capsize=5)
                ax.plot([i] * len(ys), ys, ".", color=f"C{i}", alpha=0.45)
            labels = [m if r["rho"] is None else f"{m}\nρ={r['rho']:g}" for m, r in rows]
            ax.set_xticks(range(len(rows)), labels, fontsize=8)
            ax.set_title(p["title"], fontsize=10)
            ax.grid(alpha=0.3)
            vals = [r[key] for _, r in rows if r[key]]
            if key == "lambda_max" and vals and min(vals) > 0 and max(vals) / min(vals) > 10:
                ax.set_yscale("log")
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle(f"{ylabel}: mean ± std over seeds (dots: seeds), chosen ρ", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        across.append(fname)

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, p in zip(axes[0], results.values(), strict=True):
        for i, (method, c) in enumerate(p["tuning"].items(), start=1):
            pts = [(float(k), v) for k, v in c["val_loss_by_rho"].items() if v is not None]
            pts = [(x, v) for x, v in pts if math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i}", label=method)
        base = [
            r
            for r in p["val_curve_runs"]
            if r["method"] == BASELINE and r["seed"] == p["tuning_seed"]
        ]
        if base:
            ax.axhline(base[0]["val_loss"], color="C0", ls="--", label=BASELINE)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(p["grid"], [f"{x:g}" for x in p["grid"]])
        ax.set(xlabel="ρ", title=p["title"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"validation loss, seed {next(iter(results.values()))['tuning_seed']}")
    fig.suptitle("ρ tuning", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "rho_grid.png", dpi=110)
    plt.close(fig)
    across.append("rho_grid.png")
    plots["all"] = across
    return plots


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; bad grids, seeds or jobs fail here, before any run starts."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Training and statistics are flatlm.lm.compare/stats; see the module docstring.",
    )
    arg = parser.add_argument
    arg("--profile", choices=list(PROFILES), default="cpu", help="cpu (default) or gpu (cuda)")
    arg("--out", help="output folder (default: runs/reproduce_<profile>)")
    arg("--jobs", type=int, help="parallel runs (default: cpu 2, gpu 4)")
    arg("--resume", action="store_true", help="(the default: a study always continues)")
    arg("--steps", type=int, help="training steps of every run (override, e.g. for smoke tests)")
    arg("--parts", nargs="+", choices=["gpt", "lstm"], default=["gpt", "lstm"])
    arg("--sizes", nargs="+", choices=list(GPT_SIZES), help="GPT sizes (default: the profile's)")
    arg("--grid", nargs="+", type=float, default=list(GPT_GRID), help="ρ grid of the GPT part")
    arg("--lstm-grid", nargs="+", type=float, default=list(LSTM_GRID), help="ρ grid, LSTM part")
    arg(
        "--gpt-methods",
        nargs="+",
        default=list(GPT_METHODS),
        help="methods (or variants such as gasam:alpha=1) of the GPT part; adamw first",
    )
    arg(
        "--lstm-methods",
        nargs="+",
        default=list(LSTM_METHODS),
        help="methods of the LSTM part; adamw first",
    )
    arg("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the first one tunes ρ")
    arg("--device", help="override the profile's device (cpu, cuda, cuda:1, ...)")
    arg(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="extra config override for every run, e.g. --set train.eval_batches=4 (repeatable)",
    )
    arg("--quiet", action="store_true", help="no progress bars")
    arg(
        "--probe",
        action="store_true",
        help="after each part, time its chosen methods alone, one at a time (about a minute), "
        "for the cost axis of the cost-quality chart (default: the runs' own, contended times)",
    )
    args = parser.parse_args(argv)
    if any(x <= 0 for x in [*args.grid, *args.lstm_grid]):
        parser.error("every ρ in --grid/--lstm-grid must be > 0")
    for flag, methods in (
        ("--gpt-methods", args.gpt_methods),
        ("--lstm-methods", args.lstm_methods),
    ):
        if methods[0] != BASELINE:
            parser.error(f"{flag} must start with {BASELINE} (the baseline every verdict uses)")
        for spec in methods:
            try:
                if spec_rho(spec)[1] is not None:
                    parser.error(f"{flag}: {spec!r} names rho; the grid sets it")
            except ValueError as e:
                parser.error(f"{flag}: {e}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must be distinct")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be >= 1")
    args.out = args.out or f"runs/reproduce_{args.profile}"
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) every part, rewriting the report after each; returns report.json's data."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    parts = build_parts(args)
    device = parts[0].cfg.train.device if parts else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit(f"--profile {args.profile} trains on {device}, but CUDA is not available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or PROFILES[args.profile].jobs
    meta: dict[str, Any] = {
        "command": "python benchmarks/reproduce.py" + (" " + shlex.join(argv) if argv else ""),
        "load_start": os.getloadavg(),
        "trained": 0,
        "reused": 0,
        "complete": False,
    }
    results: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {}
    for part in parts:
        done = run_part(part, out, args, jobs)
        meta["trained"] += done["counts"]["trained"]
        meta["reused"] += done["counts"]["reused"]
        results[part.name] = summarize_part(part, out / part.name, done["choice"], args.seeds)
        meta["complete"] = len(results) == len(parts)
        meta["wall_time_s"] = time.perf_counter() - t0
        report = write_report(out, args, parts, results, meta)  # after every part: partial view
    print(f"report: {out / 'report.md'} ({meta.get('wall_time_s', 0):.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    main()
