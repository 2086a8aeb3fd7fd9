"""Sharpness in workbench runs: periodic logging, a final figure, and checkpoint reports.

Why a separate module: the training loop only calls in here (a couple of lines), and everything
that could disturb the trajectory is handled here once. The sharpness functions leave parameters
bit for bit and ``.grad`` as they were; what they could still touch is the global RNG (seeded
start vectors, dropout if a figure ran in train mode), so :class:`SharpnessLogger` saves and
restores it around every call. A run with logging therefore ends with the same parameters as one
without (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flatlm.lm._process import torch_threads
from flatlm.lm.checkpoint import load_trained
from flatlm.lm.config import RunConfig, method_options
from flatlm.lm.data import train_split
from flatlm.lm.evaluate import Batches, evaluate, fixed_batches, lm_loss

# The cheap subset logged during training (split="sharpness" rows in metrics.jsonl/.csv).
LOGGED = ("hessian.lambda_max", "sam.logit_functional_ratio")


@contextlib.contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Leave the global CPU (and CUDA) RNG as it was: diagnostics must not shift dropout masks."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def double_backward_attention() -> contextlib.AbstractContextManager:
    """The math SDPA kernel: the fused (flash / memory-efficient) kernels have no second
    derivative, which every Hessian-vector product needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def eager() -> contextlib.AbstractContextManager:
    """A model compiled with ``train.compile`` runs its forward eagerly inside: every
    Hessian-vector product is a double backward, which compiled graphs (AOTAutograd) do not
    support. Nothing is compiled or recompiled for it."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is not None:
        return set_stance("force_eager")
    from torch._dynamo import config  # torch < 2.6 has no stances

    return config.patch(disable=True)


def run_rho(cfg: RunConfig) -> float:
    """The ρ the run's method was built with: options in the name, then ``method_kwargs``, then
    ``optim.rho``, then the method's default (ASAM's differs); SAM's default for the SAM
    decomposition of an AdamW run."""
    from flatlm.optim import default_rho

    rho = method_options(cfg.optim)[1].get("rho")
    if rho is None:
        rho = default_rho(cfg.optim.method)
    return float(default_rho("sam") if rho is None else rho)


class SharpnessLogger:
    """``train.sharpness_every`` / ``train.sharpness_final``: λ_max(H) by a fixed number of
    Lanczos products and SAM's logit/functional ratio, on fixed training batches."""

    def __init__(self, cfg: RunConfig, train_data: np.ndarray, device: torch.device):
        tc = cfg.train
        self.every, self.final_on = tc.sharpness_every, tc.sharpness_final
        self.iters = tc.sharpness_iters
        self.rho = run_rho(cfg)
        self.device = device
        self.batches: Batches = []
        if self.every > 0 or self.final_on:
            n, block = tc.sharpness_batches, cfg.model.block_size
            self.batches = fixed_batches(train_data, n, tc.batch_size, block, "train", device)

    def figures(self, model: nn.Module, iters: int | None = None) -> dict[str, Any]:
        """The logged figures now, plus the clean loss on the fixed batches (``loss``)."""
        from flatlm.sharpness import quick_sharpness

        with rng_preserved(self.device), double_backward_attention(), eager():
            figs = quick_sharpness(
                model, lm_loss, self.batches, lanczos_iters=iters or self.iters, rho=self.rho
            )
        return {"loss": figs.get("sam.loss")} | {k: figs.get(k) for k in LOGGED}

    def log(self, model: nn.Module, step: int, log: Any, elapsed_s: float) -> None:
        """Add a split="sharpness" record every ``sharpness_every`` steps (step 0 included)."""
        if self.every > 0 and step % self.every == 0:
            log.add(step=step, split="sharpness", elapsed_s=elapsed_s, **self.figures(model))
            log.flush()

    def final(self, model: nn.Module) -> dict[str, Any]:
        """``final_sharpness`` for result.json (twice the Lanczos products: it runs once)."""
        if not self.final_on:
            return {}
        figs = self.figures(model, iters=2 * self.iters)
        return {
            "final_sharpness": figs
            | {"lanczos_iters": 2 * self.iters, "windows": sum(len(x) for x, _ in self.batches)}
        }


def ranks_steps(step: int, world: int, changes: Sequence[dict[str, Any]] = ()) -> int:
    """Σ over the run's steps of the ranks that took each (``train.batch_size`` is per rank): a
    resume on another number of ranks is a ``world_size`` entry of ``setting_changes``."""
    total, start = 0, 0
    for change in sorted(changes, key=lambda c: c["step"]):
        if change["key"] == "world_size":
            total += (change["step"] - start) * int(change["was"])
            start = change["step"]
    return total + (step - start) * world


def regime_figures(
    model: nn.Module,
    cfg: RunConfig,
    train_data: np.ndarray,
    step: int,
    device: Any,
    world: int = 1,
    changes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """What the regime sentence needs: training loss on fixed training windows, and the tokens
    and epochs seen by all ranks together (each rank trains on its own ``batch_size`` windows)."""
    tc = cfg.train
    batches = fixed_batches(
        train_data, tc.eval_batches, tc.batch_size, cfg.model.block_size, "train", device
    )
    seen = ranks_steps(step, world, changes) * tc.batch_size * cfg.model.block_size
    return {
        "train_loss": evaluate(model, batches),
        "tokens_seen": seen,
        "train_tokens": len(train_data),
        "epochs": seen / max(1, len(train_data)),
    }


# ----------------------------------------------------------------------------- flatlm sharpness


def checkpoint_sharpness(
    path: str | Path,
    *,
    splits: Sequence[str] = ("val",),
    batches: int = 2,
    what: Sequence[str] | None = None,
    top_k: int = 1,
    trace_samples: int = 0,
    lanczos_iters: int | None = None,
    params: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    data: str | None = None,
) -> dict[str, Any]:
    """``sharpness_report`` of a trained run on fixed windows of each split in ``splits``;
    ``data``: where the run's corpus is now, if it moved (:func:`load_trained`).

    Runs with the run's ``train.threads`` (as training does): on a busy 2-core machine the
    Hessian products of a micro GPT took ~30 s with torch's default 2 threads and ~1 s with 1.
    """
    from flatlm.sharpness import sharpness_report
    from flatlm.sharpness.report import DEFAULT_FIGURES

    model, cfg, corpus, ckpt = load_trained(path, device, data)
    what = tuple(what or DEFAULT_FIGURES)
    rho = run_rho(cfg)
    figures: dict[str, dict[str, Any]] = {}
    with torch_threads(cfg.train.threads) as threads:
        for split in splits:
            data = train_split(corpus, cfg.data) if split == "train" else corpus.splits[split]
            _check_windows(batches, cfg.train.batch_size, len(data) - cfg.model.block_size, split)
            bs = fixed_batches(
                data, batches, cfg.train.batch_size, cfg.model.block_size, split, device
            )
            with double_backward_attention():
                figures[split] = sharpness_report(
                    model,
                    lm_loss,
                    bs,
                    params=params,
                    what=what,
                    top_k=top_k,
                    trace_samples=trace_samples,
                    lanczos_iters=lanczos_iters,
                    rho=rho,
                    progress=progress,
                )
    return {
        "checkpoint": str(path),
        "method": ckpt["method"],
        "seed": cfg.train.seed,
        "step": ckpt["step"],
        "settings": {
            "splits": list(splits),
            "batches": batches,
            "windows_per_split": batches * cfg.train.batch_size,
            "block_size": cfg.model.block_size,
            "what": list(what),
            "top_k": top_k,
            "trace_samples": trace_samples,
            "lanczos_iters": lanczos_iters,
            "params": params,
            "rho": rho,
            "threads": threads,
        },
        "figures": figures,
    }


def _check_windows(batches: int, batch_size: int, positions: int, split: str) -> None:
    """No more windows than the split has positions (more would repeat windows, and a huge
    count would only exhaust memory)."""
    if batches * batch_size > max(positions, 0):
        most = max(positions, 0) // batch_size
        raise ValueError(
            f"--batches {batches} asks for {batches * batch_size} windows of the {split} split, "
            f"which has {max(positions, 0)} window positions; use --batches {most} or fewer"
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def format_sharpness(report: dict[str, Any]) -> str:
    """A plain-text table: one row per figure, one column per split."""
    splits = list(report["figures"])
    keys: list[str] = []
    for figs in report["figures"].values():
        keys += [k for k in figs if k not in keys]
    rows = [["figure", *splits]] + [
        [k, *(_fmt(report["figures"][s].get(k)) for s in splits)] for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"{report['method']} seed {report['seed']} at step {report['step']} ({report['checkpoint']})"
    ]
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
