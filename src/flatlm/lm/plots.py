"""The comparison's PNG plots: validation curves, Δ vs the baseline, sharpness over training.

Each function takes what :mod:`flatlm.lm.report` collected and returns the paths it wrote (none
when there is nothing to draw). Matplotlib is imported on first use, off-screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_band(
    ax: Any, curves: list[list[list[float]]], label: str, color: str, marker: str | None
) -> None:
    """Mean over seeds with a ± 1 sample-std band (ddof=1, as in the tables; none for one
    seed), on the steps every curve has."""
    n = min(len(c) for c in curves)
    steps = np.array([s for s, _ in curves[0][:n]])
    losses = np.array([[v for _, v in c[:n]] for c in curves], dtype=float)
    mean = losses.mean(0)
    std = losses.std(0, ddof=1) if len(losses) > 1 else np.zeros_like(mean)
    ax.plot(steps, mean, color=color, marker=marker, ms=4, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def plot_curves(runs: list[dict[str, Any]], methods: list[str], out: Path) -> list[Path]:
    """``val_loss.png``: validation loss (a marker per evaluation) and training loss (every
    ``log_every`` steps), mean over each method's completed seeds with a ± 1 std band; and
    ``val_loss_by_seed.png``: a panel per method, a line per seed, dashed for a run that did not
    complete (its status in the legend)."""
    plt = _pyplot()
    done = [r for r in runs if r.get("status") == "completed"]
    methods = [m for m in methods if any(r["method"] == m and r["val_curve"] for r in runs)]
    if not methods:
        return []
    fig, (ax, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    n_seeds = set()
    for i, method in enumerate(methods):
        color = f"C{i % 10}"
        curves = [r["val_curve"] for r in done if r["method"] == method and r["val_curve"]]
        if curves:
            n_seeds.add(len(curves))
            _mean_band(ax, curves, f"{method} (n={len(curves)})", color, "o")
        train = [r.get("train_curve") for r in done if r["method"] == method]
        train = [c for c in train if c]
        if train:
            _mean_band(ax_train, train, f"{method} (n={len(train)})", color, None)
    band = "shaded: ± 1 sample std over seeds" if max(n_seeds, default=1) > 1 else "one seed"
    ax.set(
        xlabel="step",
        ylabel="validation loss (nats/token)",
        title=f"Validation loss, mean over completed seeds\n(a dot per evaluation; {band})",
    )
    ax_train.set(
        xlabel="step",
        ylabel="training loss (nats/token, one batch)",
        title=f"Training loss on each logged step's batch\n(mean over completed seeds; {band})",
    )
    for a in (ax, ax_train):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "val_loss.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods, strict=False):
        for r in sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"]):
            if r["val_curve"]:
                s, v = zip(*r["val_curve"], strict=True)
                ok = r.get("status") == "completed"
                label = f"seed {r['seed']}" + ("" if ok else f" ({r.get('status')})")
                ax.plot(s, v, ls="-" if ok else "--", marker=".", label=label)
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


def plot_deltas(deltas: dict[str, dict[str, Any]], out: Path, baseline: str) -> list[Path]:
    """``delta_vs_adamw.png``: mean Δ val/test loss per method with its 95% t-interval."""
    plt = _pyplot()
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
    """``sharpness.png``: λ_max(H) and the logit/functional ratio over training, mean over each
    method's completed runs."""
    plt = _pyplot()
    runs = [r for r in runs if r.get("status") == "completed"]
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


def plot_cost_quality(
    points: list[dict[str, Any]], path: Path, baseline: str, title: str = ""
) -> list[Path]:
    """The cost–quality chart: x = step time relative to the baseline, y = Δ test loss vs the
    baseline with its 95% t-interval, one point per method, the Pareto front drawn (the points
    no other point beats on both cost and Δ). ``points`` from
    :func:`flatlm.lm.report.cost_quality`."""
    plt = _pyplot()
    drawn = [p for p in points if p["cost"] is not None]
    if len(drawn) < 2:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for p in drawn:
        color = "C3" if p["pareto"] else "C0"
        if p["low"] is not None:
            err = [[p["delta"] - p["low"]], [p["high"] - p["delta"]]]
            ax.errorbar(p["cost"], p["delta"], yerr=err, fmt="o", color=color, capsize=4)
        else:
            ax.plot(p["cost"], p["delta"], "o", color=color)
        ax.annotate(p["method"], (p["cost"], p["delta"]), xytext=(5, 4), fontsize=8,
                    textcoords="offset points")  # fmt: skip
    front = sorted((p for p in drawn if p["pareto"]), key=lambda p: p["cost"])
    if len(front) > 1:
        ax.step([p["cost"] for p in front], [p["delta"] for p in front], where="post",
                color="C3", lw=1, alpha=0.7, label="Pareto front (mean Δ)")  # fmt: skip
        ax.legend(fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xlabel=f"step time relative to {baseline}",
        ylabel=f"Δ test loss vs {baseline} (nats/token)",
        title=title or f"cost and gain vs {baseline} (95% t-interval over seeds)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
