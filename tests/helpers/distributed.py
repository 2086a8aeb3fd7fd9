"""Spawning gloo process groups for the multi-process tests, and the worker of the 2-process DDP
tests (importable by spawned processes)."""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from flatlm.optim import create
from helpers.optim import make_batch, make_mlp

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _logged(rank: int, logs: str, worker: Callable[..., None], *args: Any) -> None:
    # This rank's standard error (C++ included) goes to a file, and faulthandler writes every
    # thread's Python stack there on SIGABRT/SIGSEGV: a rank that dies by a signal says where.
    fd = os.open(f"{logs}/rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    worker(rank, *args)


def _run(worker: Callable[..., None], world: int, args: tuple[Any, ...]) -> str | None:
    """One spawn of the ranks; None when all of them finished, else why one died by a signal
    (the end of every rank's standard error: a C++ abort's message, faulthandler's stacks)."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        try:
            mp.spawn(
                _logged, args=(logs, worker, world, free_port(), *args), nprocs=world, join=True
            )
        except mp.ProcessExitedException as e:
            if not e.signal_name:  # an exit code: the worker's own doing, not retried
                raise
            tails = {
                r: Path(f"{logs}/rank{r}.log").read_text(errors="replace")[-6000:]
                for r in range(world)
                if Path(f"{logs}/rank{r}.log").exists()
            }
            lines = [ln for ln in tails.get(e.error_index, "").splitlines() if ln.strip()]
            cause = next((ln for ln in lines if "what()" in ln or "Fatal" in ln), "")
            shown = "\n".join(f"--- rank {r}'s standard error ---\n{t}" for r, t in tails.items())
            return f"rank {e.error_index} died by {e.signal_name}: {cause}\n{shown}"
    return None


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """``worker(rank, world, port, *args)`` on ``world`` gloo processes, each writing its results
    to files it overwrites. An exception in a rank fails at once. A rank killed by a signal
    (seen once in CI: SIGABRT inside torch, no Python error) is retried once from the start,
    with a warning that carries the ranks' standard error; a second death fails with it."""
    died = _run(worker, world, args)
    if died is None:
        return
    warnings.warn(f"retrying a spawned process group once: {died}", stacklevel=2)
    died = _run(worker, world, args)
    if died is not None:
        raise RuntimeError(died)


def global_batches(n: int = 16):
    return [make_batch(seed=s, n=n) for s in range(STEPS)]


def ddp_worker(rank: int, world: int, port: int, out: str, specs: list[tuple[str, str, int]]):
    init_gloo(rank, world, port)
    try:
        results = {}
        for name, mode, micro in specs:
            model = make_mlp()
            ddp = DDP(model)
            opt = create(name, model.parameters(), rho=0.2, lr=0.01, distributed=mode)
            for x, y in global_batches():
                xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
                if micro == 1:
                    opt.step(
                        forward=lambda xs=xs: ddp(xs),
                        loss_fn=lambda z, ys=ys: F.cross_entropy(z, ys),
                        no_sync=ddp.no_sync,
                    )
                else:
                    opt.step(
                        forward=lambda mb: ddp(mb[0]),
                        loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
                        micro_batches=list(zip(xs.chunk(micro), ys.chunk(micro), strict=True)),
                        no_sync=ddp.no_sync,
                    )
            results[f"{name}/{mode}/{micro}"] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def aborting_worker(rank: int, world: int, port: int) -> None:
    """Rank 0 aborts in C, as a C++ abort inside torch would; the others finish."""
    if rank == 0:
        import ctypes

        ctypes.CDLL(None).abort()
