"""Memory per rank of each method under FSDP2, against the same method unsharded.

A sharpness-aware method keeps one extra copy of θ between steps (the clean copy; GA-SAM's EMA
and ``perturb_every``'s stored direction are one more each). Under FSDP2 each rank keeps the
copy of its own shard only, so per rank the extra memory should be ≈ 1/N of the unsharded
figure. This counts, on every rank after two steps of a GPT model sharded as the workbench
shards it (each block, then the root), the bytes of the rank's parameter shards, of the base
optimizer's state and of the method's own (``extra_bytes()``), spawning N gloo processes on CPU.

    python benchmarks/fsdp_memory.py                       # GPT small, N = 1 (unsharded), 2, 4
    python benchmarks/fsdp_memory.py --size medium --world 2 --methods sam gasam
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flatlm.lm.models import GPT, GPT_SIZES
from flatlm.optim import create, parse_method

DEFAULT_METHODS = ["sam", "fsam", "gasam", "sam:perturb_every=2"]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def measure(spec: str, size: str, vocab: int, sharded: bool) -> dict[str, int]:
    """Two steps of ``spec`` on this rank; the bytes this rank holds."""
    n_layer, n_head, n_embd = GPT_SIZES[size]
    torch.manual_seed(0)
    model = GPT(vocab, 64, n_layer, n_head, n_embd)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    name, options = parse_method(spec)
    opt = create(name, model.parameters(), **{"lr": 1e-3, **options})
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        idx = torch.randint(0, vocab, (4, 65), generator=gen)
        opt.step(
            forward=lambda idx=idx: model(idx[:, :-1]),
            loss_fn=lambda z, idx=idx: F.cross_entropy(z.flatten(0, 1), idx[:, 1:].flatten()),
        )
    base_state = [
        _local(t) for st in opt.base_optimizer.state.values() for t in st.values() if t.dim() > 0
    ]
    return {
        "params": _bytes(_local(p) for p in model.parameters()),
        "base_state": _bytes(base_state),
        "extra": opt.extra_bytes(),
    }


def _worker(rank: int, world: int, port: int, out: str, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = {m: measure(m, args.size, args.vocab, sharded=True) for m in args.methods}
        Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=GPT_SIZES)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    unsharded = {m: measure(m, args.size, args.vocab, sharded=False) for m in args.methods}
    results = {"size": args.size, "unsharded": unsharded, "sharded": {}}
    for world in args.world:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _free_port(), out, args), nprocs=world, join=True)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        results["sharded"][world] = ranks

    mib = 2**20
    print(f"GPT {args.size}: bytes held per rank after two steps (MiB); extra = the method's own")
    print(
        "| method | N | params / rank | AdamW state / rank | extra / rank (max) | × 1/N of unsharded extra |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for m in args.methods:
        u = unsharded[m]
        print(
            f"| {m} | 1 (unsharded) | {u['params'] / mib:.2f} | {u['base_state'] / mib:.2f} "
            f"| {u['extra'] / mib:.2f} | 1.00 |"
        )
        for world, ranks in results["sharded"].items():
            worst = max(r[m]["extra"] for r in ranks)
            print(
                f"| {m} | {world} | {max(r[m]['params'] for r in ranks) / mib:.2f} "
                f"| {max(r[m]['base_state'] for r in ranks) / mib:.2f} | {worst / mib:.2f} "
                f"| {worst / (u['extra'] / world):.3f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
