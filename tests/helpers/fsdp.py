"""Runs for the 2-process gloo FSDP2 tests: each spec trains TinyMLP sharded with fully_shard
on this rank's half of every global batch (importable by spawned processes)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flatlm.optim import create, gradient_sync
from helpers.distributed import global_batches, init_gloo
from helpers.optim import make_mlp


@dataclass(frozen=True)
class Spec:
    """One run: ``create(name, rho=0.2, lr=0.01, **kw)`` over ``global_batches()``."""

    name: str
    kw: dict[str, Any] = field(default_factory=dict)
    micro: int = 1  # micro-batches per rank, reduce-scattered once (gradient_sync)
    dropout: float = 0.0
    bf16: bool = False  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    autocast: bool = False  # float32 shards, each forward under torch.autocast(bf16)

    @property
    def low_precision(self) -> bool:
        return self.bf16 or self.autocast

    poison_step: int | None = None  # this step is NaN on rank 1 only:
    poison: str = "input"  # its batch (so its gradient too), or only its loss (a NaN constant)

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.kw.items()))
        extra = f"/micro={self.micro}/dropout={self.dropout}/bf16={self.bf16}"
        extra += "/autocast" if self.autocast else ""
        return f"{self.name}:{opts}{extra}/poison={self.poison_step}:{self.poison}"


def shard(model: nn.Module, bf16: bool = False, mesh: Any = None) -> nn.Module:
    """fully_shard each Linear, then the root (FSDP2's usual layout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full(params: Any) -> list[torch.Tensor]:
    """Every parameter whole (an all-gather for DTensors), detached."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]


def _options(spec: Spec) -> dict[str, Any]:
    return {"lr": 0.01, **spec.kw} if spec.name == "adamw" else {"rho": 0.2, "lr": 0.01, **spec.kw}


def train(spec: Spec, rank: int, world: int, mesh: Any = None) -> dict[str, Any]:
    """Train ``spec`` sharded over ``mesh`` (default: all ranks); returns its outcome."""
    dtype = torch.float32 if spec.low_precision else torch.float64
    module = shard(make_mlp(dtype=dtype, dropout=spec.dropout), spec.bf16, mesh)

    def model(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.autocast):
            return module(x)

    opt = create(spec.name, module.parameters(), **_options(spec))
    torch.manual_seed(100 + rank)  # dropout: each rank its own masks, as in real training
    losses = []
    for step, (x, y) in enumerate(global_batches()):
        x = x.to(dtype).chunk(world)[rank]
        y = y.chunk(world)[rank]
        nan_loss = 0.0
        if spec.poison_step == step and rank == 1:
            if spec.poison == "input":
                x = torch.full_like(x, float("nan"))
            else:  # a loss term without gradient: the gradients stay finite on every rank
                nan_loss = float("nan")
        if spec.name == "adamw":  # a plain optimizer: one forward-backward, then step
            loss = F.cross_entropy(model(x), y) + nan_loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        elif spec.micro == 1:
            loss = opt.step(
                forward=lambda x=x: model(x),
                loss_fn=lambda z, y=y, c=nan_loss: F.cross_entropy(z, y) + c,
            )
        else:
            loss = opt.step(
                forward=lambda mb: model(mb[0]),
                loss_fn=lambda z, mb, c=nan_loss: F.cross_entropy(z, mb[1]) + c,
                micro_batches=list(zip(x.chunk(spec.micro), y.chunk(spec.micro), strict=True)),
                no_sync=gradient_sync(module),
            )
        losses.append(float(loss))
    return {
        "params": full(module.parameters()),
        "local_dtypes": [str(p.to_local().dtype) for p in module.parameters()],
        "skipped": getattr(opt, "skipped_steps", 0),
        "extra_bytes": getattr(opt, "extra_bytes", lambda: 0)(),
        "losses": losses,
    }


def _shards(model: nn.Module) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def restore_checks(rank: int, world: int) -> dict[str, bool]:
    """θ after a step with lr = 0, and after a perturbed pass that raised, is θ bit for bit."""
    out = {}
    for name in ("sam", "fsam", "gasam"):
        model = shard(make_mlp())
        opt = create(name, model.parameters(), rho=0.2, lr=0.0, weight_decay=0.0)
        before = _shards(model)
        for x, y in global_batches():
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.step(forward=lambda x=x: model(x), loss_fn=lambda z, y=y: F.cross_entropy(z, y))
        out[f"{name}/lr0"] = _same(before, _shards(model))

        opt = create(name, model.parameters(), rho=0.2, lr=0.01)
        x, y = global_batches()[0]
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        calls = []

        def forward(x=x):
            calls.append(1)
            if len(calls) == 2:  # the perturbed pass, on every rank
                raise RuntimeError("boom")
            return model(x)

        with contextlib.suppress(RuntimeError):
            opt.step(forward=forward, loss_fn=lambda z, y=y: F.cross_entropy(z, y))
        out[f"{name}/raised"] = _same(before, _shards(model)) and not opt.state
    return out


def worker(rank: int, world: int, port: int, out: str, specs: list[Spec]) -> None:
    """Every spec sharded over all ranks, then (rank 0 alone, an FSDP2 mesh of one rank on the
    global batch) the low-precision specs again as their reference; then the restore checks."""
    from torch.distributed.device_mesh import DeviceMesh

    init_gloo(rank, world, port)
    try:
        results: dict[str, Any] = {spec.key: train(spec, rank, world) for spec in specs}
        alone = dist.new_group([0])
        if rank == 0:
            mesh = DeviceMesh.from_group(alone, "cpu")
            for spec in specs:
                if spec.low_precision:
                    results[f"{spec.key}/one rank"] = train(spec, 0, 1, mesh)
        results["restore"] = restore_checks(rank, world)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --- checkpoints through torch.distributed.checkpoint ----------------------------------------

#: (method, options) checkpointed: SAM, GA-SAM's EMA with a stored direction, PSAM's use of P.
CHECKPOINTED = [
    ("sam", {}),
    ("gasam", {"perturb_every": 2}),
    ("psam", {}),
    ("sam:policy=looksam,every=2", {}),  # g_v stored sharded, resumed mid-cycle
    ("bsam:num_data=64", {}),  # m and s sharded, the noise count in the groups
]


def dcp_save(model: nn.Module, opt: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=path)


def dcp_load(model: nn.Module, opt: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _step(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.step(forward=lambda: model(x), loss_fn=lambda z: F.cross_entropy(z, y))


def run_checkpointed(
    name: str, kw: dict[str, Any], rank: int, world: int, folder: str, sharded: bool
) -> dict[str, list[torch.Tensor]]:
    """Two steps, save to ``folder/saved_on_<world>``; one more step ("went on"). Then a fresh
    model and optimizer load the checkpoint the other world size saved and take that third step
    ("resumed")."""
    batches = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in global_batches()]

    def build() -> tuple[nn.Module, Any]:
        model = make_mlp()
        model = shard(model) if sharded else model
        return model, create(name, model.parameters(), rho=0.2, lr=0.01, **kw)

    model, opt = build()
    for x, y in batches[:2]:
        _step(opt, model, x, y)
    dcp_save(model, opt, f"{folder}/{name}/saved_on_{world}")
    _step(opt, model, *batches[2])
    went_on = full(model.parameters())

    other = 1 if world == 2 else 2
    model, opt = build()
    dcp_load(model, opt, f"{folder}/{name}/saved_on_{other}")
    _step(opt, model, *batches[2])
    return {"went on": went_on, "resumed": full(model.parameters())}


def checkpoint_worker(rank: int, world: int, port: int, folder: str) -> None:
    init_gloo(rank, world, port)
    try:
        results = {
            name: run_checkpointed(name, kw, rank, world, folder, sharded=True)
            for name, kw in CHECKPOINTED
        }
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
