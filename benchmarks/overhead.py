"""Step time and memory of every flatlm method against plain AdamW on a GPT-style model.

A two-pass sharpness-aware step costs two forward–backward passes, so its floor is about twice
an AdamW step (goal: ``t_method / (2 · t_adamw) ≤ 1.05``); the one-pass methods (``msam``: one
forward–backward; ``mfsam``/``mpfsam``: a no-grad forward plus one forward–backward) and
``perturb_every=k`` aim lower. ``× AdamW`` is every method's cost relative to AdamW, the x-axis
of the cost–quality charts. Methods are interleaved (each repetition times every method once, in
a shuffled order) and medians reported, so drift in machine load hits all of them alike.

    python benchmarks/overhead.py       # CPU, sizes micro and tiny, every method + perturb_every
    python benchmarks/overhead.py --sizes small --device cuda --batch 32 --seq 256
    python benchmarks/overhead.py --methods sam sam:perturb_every=2 sam:perturb_every=4

With ``pytorch_optimizer`` installed (``pip install -e .[bench]``) the same run also times its SAM
(``pto-sam``: its documented closure protocol, the same AdamW base and ρ) and checks, before
timing, that it and flatlm's SAM reach the same parameters after a few steps from one
initialisation, so the two step times compare like with like.

Extra memory is what a method keeps between steps beyond AdamW's own state (the clean copy of θ,
GA-SAM's EMA), in bytes and as a multiple of the parameter size; the functional methods also hold
the logits-sized dlogits *during* a step, reported separately.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from flatlm.lm.models import GPT, GPT_SIZES
from flatlm.optim import METHODS, SharpnessAwareOptimizer, create, parse_method

PTO = "pto-sam"  # pytorch_optimizer's SAM over the same AdamW
#: Every method, then SAM with a fresh ε every k-th step only.
#: bsam needs N (its noise variance is 1/(N·s)); any N times the same passes.
BSAM = "bsam:num_data=10000"
DEFAULT_METHODS = [
    *(BSAM if m == "bsam" else m for m in METHODS),
    *(f"sam:perturb_every={k}" for k in (2, 4, 8)),
]
RHO = 0.05  # SAM's default, used for flatlm's SAM and pytorch_optimizer's alike


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def extra_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held between steps beyond the base AdamW state."""
    if not isinstance(opt, SharpnessAwareOptimizer):
        return 0
    return opt.extra_bytes()


def _pytorch_optimizer_sam():
    try:
        from pytorch_optimizer import SAM as PtoSAM
    except ImportError:
        return None
    return PtoSAM


def make_stepper(name, model, x, y, lr=3e-4):
    def loss_fn(logits):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    if name == PTO:  # its README's protocol: clean backward, then step(closure)
        opt = _pytorch_optimizer_sam()(
            model.parameters(), torch.optim.AdamW, rho=RHO, lr=lr, weight_decay=0.1
        )

        def closure():
            loss = loss_fn(model(x))
            loss.backward()
            return loss

        def step():
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step(closure)

        return opt, step

    opt = create(name, model.parameters(), lr=lr, weight_decay=0.1)
    if isinstance(opt, SharpnessAwareOptimizer):

        def step():
            opt.step(forward=lambda: model(x), loss_fn=loss_fn)

    else:

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x)).backward()
            opt.step()

    return opt, step


def parity_with_pytorch_optimizer(size: str, args, device: torch.device, steps: int = 5) -> dict:
    """flatlm's SAM and pytorch_optimizer's SAM from one initialisation on one batch: how far
    apart the parameters end, relative to how far they moved. pytorch_optimizer takes the gradient
    norm in float32 (and adds 1e-12 to it), so expect float32-rounding-sized differences."""
    n_layer, n_head, n_embd = GPT_SIZES[size]
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    out = {}
    for dtype in (torch.float32, torch.float64):
        models = []
        for name in ("sam", PTO):
            torch.manual_seed(0)
            model = GPT(args.vocab, args.seq, n_layer, n_head, n_embd).to(device, dtype)
            _, step = make_stepper(name, model, x, y, lr=1e-3)
            start = [p.detach().clone() for p in model.parameters()]
            for _ in range(steps):
                step()
            models.append((model, start))
        (ours, start), (theirs, _) = models
        ours.requires_grad_(False)
        theirs.requires_grad_(False)
        pairs = zip(ours.parameters(), theirs.parameters(), start, strict=True)
        diff, moved = zip(*[((a - b).norm(), (a - s).norm()) for a, b, s in pairs], strict=True)
        diff, moved = torch.stack(diff), torch.stack(moved)
        out[str(dtype).removeprefix("torch.")] = float(diff.norm() / moved.norm())
    return out


def bench_size(size: str, args, device: torch.device) -> list[dict]:
    n_layer, n_head, n_embd = GPT_SIZES[size]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    runs = {}
    for name in args.methods:
        torch.manual_seed(0)
        model = GPT(args.vocab, args.seq, n_layer, n_head, n_embd).to(device)
        opt, step = make_stepper(name, model, x, y)
        for _ in range(args.warmup):
            step()
        _sync(device)
        runs[name] = {"model": model, "opt": opt, "step": step, "times": []}

    order = list(args.methods)
    rng = random.Random(0)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for name in order:
            run = runs[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                run["step"]()
            _sync(device)
            run["times"].append((time.perf_counter() - t0) / args.steps)

    param_bytes = _tensor_bytes(list(runs[args.methods[0]]["model"].parameters()))
    n_params = sum(p.numel() for p in runs[args.methods[0]]["model"].parameters())
    logits_bytes = args.batch * args.seq * args.vocab * 4
    base = statistics.median(runs["adamw"]["times"]) if "adamw" in runs else None
    sam_time = statistics.median(runs["sam"]["times"]) if "sam" in runs else None
    rows = []
    for name in args.methods:
        run = runs[name]
        t = statistics.median(run["times"])
        extra = extra_bytes(run["opt"])
        functional = getattr(run["opt"], "functional", False)
        rows.append(
            {
                "size": size,
                "params": n_params,
                "method": name,
                "step_ms": 1e3 * t,
                "iqr_ms": 1e3
                * (
                    statistics.quantiles(run["times"], n=4)[2]
                    - statistics.quantiles(run["times"], n=4)[0]
                ),
                "ratio_to_2x_adamw": (t / (2 * base)) if base and name != "adamw" else None,
                "x_adamw": (t / base) if base else None,
                # flatlm's SAM over this one: < 1 means flatlm is faster
                "sam_over_this": (sam_time / t) if sam_time and name == PTO else None,
                "extra_bytes": extra,
                "extra_param_copies": extra / param_bytes,
                "transient_dlogits_bytes": logits_bytes if functional else 0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["micro", "tiny"], choices=list(GPT_SIZES))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="method names or specs, e.g. sam sam:perturb_every=2 (default: every method and "
        "sam:perturb_every=2/4/8)",
    )
    parser.add_argument(
        "--no-pytorch-optimizer",
        action="store_true",
        help="skip the comparison with pytorch_optimizer's SAM even where it is installed",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is far less disturbed by other load",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    for spec in args.methods:
        if spec != PTO:
            parse_method(spec)  # a clear error for a bad name before anything runs
    if "adamw" not in args.methods:
        args.methods = ["adamw", *args.methods]
    with_pto = not args.no_pytorch_optimizer and _pytorch_optimizer_sam() is not None
    if with_pto and PTO not in args.methods:
        args.methods = [*args.methods, *(["sam"] if "sam" not in args.methods else []), PTO]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={args.batch} seq={args.seq} vocab={args.vocab} "
        f"({args.repeats} interleaved blocks of {args.steps} steps, medians)"
    )
    print(
        f"{'size':<6} {'params':>8} {'method':<20} {'step ms':>9} {'IQR':>7} {'× AdamW':>8} "
        f"{'/(2·AdamW)':>10} {'extra mem':>10} {'× params':>8} {'dlogits':>9}"
    )
    rows = []
    parity = {}
    for size in args.sizes:
        if PTO in args.methods:
            parity[size] = parity_with_pytorch_optimizer(size, args, device)
            print(
                f"{size}: flatlm SAM vs pytorch_optimizer SAM after 5 steps, "
                "‖θ_flatlm − θ_pto‖ / ‖θ_flatlm − θ_0‖: "
                + ", ".join(f"{k} {v:.1e}" for k, v in parity[size].items())
            )
        for r in bench_size(size, args, device):
            rows.append(r)
            ratio = "" if r["ratio_to_2x_adamw"] is None else f"{r['ratio_to_2x_adamw']:.3f}"
            times = "" if r["x_adamw"] is None else f"{r['x_adamw']:.3f}"
            vs = (
                ""
                if r["sam_over_this"] is None
                else f"  flatlm sam / this: {r['sam_over_this']:.3f}"
            )
            print(
                f"{r['size']:<6} {r['params'] / 1e6:>7.2f}M {r['method']:<20} {r['step_ms']:>9.2f} "
                f"{r['iqr_ms']:>7.2f} {times:>8} {ratio:>10} {r['extra_bytes'] / 2**20:>8.2f}Mi "
                f"{r['extra_param_copies']:>8.2f} {r['transient_dlogits_bytes'] / 2**20:>7.1f}Mi"
                + vs
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "parity": parity}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
