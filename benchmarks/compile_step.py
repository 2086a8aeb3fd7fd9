"""The workbench's training step, eager against ``torch.compile``, for AdamW and the methods.

Each (method, eager|compiled) pair starts from one initialisation and runs the workbench's own
``flatlm.lm.train.train_step`` on one fixed batch. The compiled model is compiled in place by
``flatlm.optim.compile.compile_model`` (what ``train.compile`` uses); its first steps compile
(``compile_s``: the warm-up's time beyond its steps' timed cost; a later run of the same
size reuses the graph the first one compiled, so it shows about 0 and ``graphs`` 0), then the runs are interleaved (each repetition times every run once, in
a shuffled order) and medians reported, so drift in machine load hits all of them alike. Also
reported: the graphs Dynamo compiled for a run and any it compiled after the warm-up (a
recompilation, which should never happen), and how far the compiled run's parameters ended from
the eager run's, relative to how far they moved (Inductor reorders floating-point sums).

    python benchmarks/compile_step.py                        # CPU: sizes micro and tiny
    python benchmarks/compile_step.py --sizes small --batch 16 --seq 128 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

from flatlm.lm.models import GPT, GPT_SIZES
from flatlm.lm.train import train_step
from flatlm.optim import create, parse_method
from flatlm.optim.compile import compile_counts, compile_model

GRAD_CLIP = 1.0


def _runs(size: str, args) -> dict[tuple[str, str], dict]:
    n_layer, n_head, n_embd = GPT_SIZES[size]
    torch.manual_seed(0)
    base = GPT(args.vocab, args.seq, n_layer, n_head, n_embd, dropout=args.dropout)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    runs = {}
    for method in args.methods:
        for variant in ("eager", "compiled"):
            model = copy.deepcopy(base)
            start = [p.detach().clone() for p in model.parameters()]
            before = compile_counts()
            if variant == "compiled":
                compile_model(model, backend=args.backend)
            opt = create(
                method,
                model,
                lr=3e-4,
                weight_decay=0.1,
                **({} if method == "adamw" else {"max_grad_norm": GRAD_CLIP}),
            )
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                train_step(model, opt, x, y, grad_clip=GRAD_CLIP)
            runs[(method, variant)] = {
                "model": model,
                "opt": opt,
                "start": start,
                "x": x,
                "y": y,
                "warmup_s": time.perf_counter() - t0,
                "counts": compile_counts() - before,
                "times": [],
            }
    return runs


def bench_size(size: str, args) -> list[dict]:
    runs = _runs(size, args)
    warm = compile_counts()
    order = list(runs)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for key in order:
            run = runs[key]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(run["model"], run["opt"], run["x"], run["y"], grad_clip=GRAD_CLIP)
            run["times"].append((time.perf_counter() - t0) / args.steps)
    recompiled = compile_counts() - warm
    rows = []
    n_params = sum(p.numel() for p in runs[order[0]]["model"].parameters())
    for method in args.methods:
        eager, compiled = runs[(method, "eager")], runs[(method, "compiled")]
        t_eager, t_compiled = (
            statistics.median(eager["times"]),
            statistics.median(compiled["times"]),
        )
        rows.append(
            {
                "size": size,
                "params": n_params,
                "method": method,
                "eager_ms": 1e3 * t_eager,
                "compiled_ms": 1e3 * t_compiled,
                "speedup": t_eager / t_compiled,
                "compile_s": max(0.0, compiled["warmup_s"] - args.warmup * t_compiled),
                "graphs": compiled["counts"].graphs,
                "recompiles_after_warmup": recompiled.frames,
                "param_rel_diff": _rel_diff(eager, compiled),
            }
        )
    return rows


def _rel_diff(eager: dict, compiled: dict) -> float:
    """‖θ_compiled − θ_eager‖ / ‖θ_eager − θ_0‖ after the same steps."""
    with torch.no_grad():
        pairs = zip(
            eager["model"].parameters(), compiled["model"].parameters(), eager["start"], strict=True
        )
        diff, moved = zip(*[((a - b).norm(), (a - s).norm()) for a, b, s in pairs], strict=True)
        return float(torch.stack(diff).norm() / torch.stack(moved).norm())


def format_table(rows: list[dict]) -> str:
    lines = [
        "| size | params | method | eager ms/step | compiled ms/step | speedup | compile s "
        "| graphs | recompiles | Δθ (rel.) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.2f} M | {r['method']} | {r['eager_ms']:.1f} "
            f"| {r['compiled_ms']:.1f} | {r['speedup']:.2f} | {r['compile_s']:.1f} "
            f"| {r['graphs']} | {r['recompiles_after_warmup']} | {r['param_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "tiny"], choices=list(GPT_SIZES))
    parser.add_argument("--methods", nargs="+", default=["adamw", "sam", "fsam"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (compiles)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    for method in args.methods:
        parse_method(method)  # an unknown name fails before anything compiles
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for size in args.sizes for row in bench_size(size, args)]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
