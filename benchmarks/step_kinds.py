"""Step time of each kind of step alone, on the workbench settings' own models: the cost axis of
the ρ-schedule and step-policy measurements (docs/results.md, "SAM only when it pays").

A run's cost is its mix of steps (``step_counts`` in result.json: fresh two-pass, reuse and plain
one-pass steps) times these times, relative to AdamW's step: measured step times, amortised over
what the run did, not pass counts. Kinds (each with the setting's tuned full-SAM ρ):

- ``adamw``: torch's AdamW, global-norm clipping (the workbench's baseline step);
- ``fresh``: a SAM step (clean pass, ε, second pass at θ + ε);
- ``plain``: a SAM step with every group's ρ set to 0, as a ρ schedule sets it outside its window
  (the engine's one-pass path: AdamW's step through the wrapper);
- ``reuse``: SAM with ``perturb_every`` so large that after its first step every step reuses the
  stored direction (one pass at θ + ρδ);
- ``looksam_reuse``: LookSAM's in-between step (a clean pass, then the stored correction added),
  every past the first by the same trick;
- ``msam``: the one-pass Momentum-SAM step;
- ``wsam``, ``gsam``, ``friendlysam``, ``gcsam``, ``bsam``: each method's own fresh step (two
  passes, and the elementwise work of its rule; bSAM's noise draw, copy-back and own update);
- more with ``--kind NAME=SPEC`` (e.g. a step policy's in-between step).

Kinds are interleaved (each round times every kind once, in a shuffled order) and the median
over rounds reported, so drift in machine load hits all alike; the 1-minute load average before
and after is recorded, and ``contended`` says whether it exceeded the threads in use::

    python benchmarks/step_kinds.py --json docs/data/step_kinds.json   # the docs' numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flatlm.lm.config import RunConfig, load_config
from flatlm.lm.models import build_model, count_params
from flatlm.lm.train import make_optimizer, train_step

ROOT = Path(__file__).resolve().parent.parent
#: The settings: a config, and the tuned full-SAM ρ of docs/results.md's one-pass section.
SETTINGS: dict[str, tuple[dict[str, Any], float]] = {
    "lstm": ({"path": ROOT / "docs" / "experiments" / "gasam_lstm.toml"}, 2.0),
    "quick": ({"preset": "quick"}, 0.2),  # overfit trains the same model: the same step times
}
HUGE = 10**9  # perturb_every this large: one fresh step, then only reuse
KINDS = {
    "adamw": "adamw",
    "fresh": "sam",
    "plain": "sam",  # with ρ = 0 in every group
    "reuse": f"sam:perturb_every={HUGE}",
    "looksam_reuse": f"sam:policy=looksam,every={HUGE}",
    "msam": "msam",
    # The SAM family's two-pass methods whose fresh step does elementwise work beyond SAM's
    # (docs_tables prices their fresh steps with these): WSAM, GSAM, FriendlySAM, GCSAM, bSAM
    # (any N times the same work).
    **{m: m for m in ("wsam", "gsam", "friendlysam", "gcsam")},
    "bsam": "bsam:num_data=100000",
}


def _stepper(cfg: RunConfig, spec: str, rho: float, vocab: int, zero_rho: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab)
    optim = cfg.optim
    optim.method, optim.rho = spec, rho
    opt = make_optimizer(model, optim, cfg.train.grad_clip)
    if zero_rho:
        for group in opt.param_groups:
            group["rho"] = 0.0
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.train.batch_size, cfg.model.block_size)
    x = torch.randint(0, vocab, shape, generator=gen)
    y = torch.randint(0, vocab, shape, generator=gen)

    def step() -> None:
        train_step(model, opt, x, y, cfg.train.grad_clip)

    return model, opt, step


def bench_setting(name: str, kinds: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    where, rho = SETTINGS[name]
    cfg = load_config(**where)
    vocab = cfg.data.vocab_size
    steppers, params = {}, 0
    for kind, spec in kinds.items():
        model, _, step = _stepper(load_config(**where), spec, rho, vocab, kind == "plain")
        for _ in range(args.warmup):  # reuse kinds: past their one fresh step
            step()
        steppers[kind], params = step, count_params(model)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for kind in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steppers[kind]()
            times[kind].append(1000 * (time.perf_counter() - t0) / args.steps)
    ms = {k: statistics.median(v) for k, v in times.items()}
    iqr = {
        k: float(statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0])
        for k, v in times.items()
    }
    return {
        "rho": rho,
        "params": params,
        "batch": [cfg.train.batch_size, cfg.model.block_size],
        "specs": kinds,
        "ms": ms,
        "iqr_ms": iqr,
        "vs_adamw": {k: v / ms["adamw"] for k, v in ms.items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--kind", action="append", default=[], metavar="NAME=SPEC",
                   help="one more kind: a method spec timed at the setting's ρ")  # fmt: skip
    p.add_argument("--repeats", type=int, default=7, help="rounds over all kinds")
    p.add_argument("--steps", type=int, default=8, help="steps per kind per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per kind first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    kinds = dict(KINDS)
    for item in args.kind:
        name, eq, spec = item.partition("=")
        if not eq:
            p.error(f"--kind {item!r}: expected NAME=SPEC")
        kinds[name] = spec
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    out = {"settings": {name: bench_setting(name, kinds, args) for name in args.settings}}
    load_after = os.getloadavg()[0]
    out |= {
        "command": " ".join(["python", "benchmarks/step_kinds.py", *(argv or sys.argv[1:])]),
        "threads": args.threads,
        "repeats": args.repeats,
        "steps": args.steps,
        "load_avg_1min": [load_before, load_after],
        "contended": max(load_before, load_after) > args.threads + 0.5,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    for name, r in out["settings"].items():
        cells = ", ".join(f"{k} {v:.1f} ms ({r['vs_adamw'][k]:.2f}x)" for k, v in r["ms"].items())
        print(f"{name}: {cells}")
    print(
        f"load average {load_before:.1f} -> {load_after:.1f}"
        + (" (contended)" if out["contended"] else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
