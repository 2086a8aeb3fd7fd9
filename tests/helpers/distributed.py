"""Worker for the 2-process gloo DDP tests (importable by spawned processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from flatlm.optim import create
from helpers.optim import make_batch, make_mlp

STEPS = 3


def global_batches(n: int = 16):
    return [make_batch(seed=s, n=n) for s in range(STEPS)]


def ddp_worker(rank: int, world: int, port: int, out: str, specs: list[tuple[str, str, int]]):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
