"""FSDP2 (``fully_shard``): the engine works on each rank's shard and sums norms over shards.

A parameter sharded by FSDP2 is a DTensor whose local tensor is this rank's rows. Everything a
sharpness-aware step does to θ is elementwise (copy, add, scale, divide by P), so it runs on the
local shards with plain foreach ops (DTensor has no sharding rule for ``_foreach_copy_``, and
the local path skips DTensor's dispatch). Only norms are global: a rank sums the squares of its
shard and one scalar all-reduce over the shard group completes them. The engine enters
:func:`reducing` for the length of a step; :func:`sum_over_shards` reads it.

The boundary is :func:`local`: the rules, the preconditioners and the base optimizer's state the
rules read all see local tensors, and the method's own per-parameter state is stored as DTensors
sharded like the parameter (:func:`like_param`), so ``torch.distributed.checkpoint`` can
reshard it like Adam's moments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "Sharding",
    "ShardingOf",
    "clip_grad_norm_",
    "gradient_sync",
    "is_sharded",
    "like_param",
    "local",
    "local_state",
    "locals_of",
    "over_shards",
    "reduces",
    "reducing",
    "sum_of_squares",
    "sum_over_shards",
]

try:  # torch built without distributed support has no DTensor: nothing can be sharded then
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_sharded(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself, in place, not a copy); t otherwise."""
    return t._local_tensor if is_sharded(t) else t  # type: ignore[attr-defined]


def locals_of(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [local(t) for t in tensors]


def local_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A parameter's state with its DTensors as local shards (the mapping itself if none is)."""
    if not any(is_sharded(v) for v in state.values()):
        return state
    return {k: local(v) if is_sharded(v) else v for k, v in state.items()}


def like_param(value: Tensor, param: Tensor) -> Tensor:
    """A local shard as a DTensor sharded like ``param`` (for state kept per parameter); a
    0-dim value (a step count) or a value of an unsharded parameter stays as it is."""
    if not is_sharded(param) or value.dim() == 0:
        return value
    return DTensor.from_local(  # type: ignore[union-attr]
        value,
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


@dataclass(frozen=True)
class Sharding:
    """How the parameters are sharded: the process group that holds one copy of θ between its
    ranks (None: not sharded, norms are local)."""

    group: Any = None

    @classmethod
    def of(cls, params: Sequence[Tensor]) -> Sharding:
        """Check the parameters are all unsharded or all FSDP2-sharded on one mesh, and say
        over which group a norm's partial sums are added."""
        _refuse_flat_parameters(params)
        dtensors = [p for p in params if is_sharded(p)]
        if not dtensors:
            return cls()
        if len(dtensors) != len(params):
            raise ValueError(
                f"{len(dtensors)} of {len(params)} parameters are DTensors (FSDP2 fully_shard) "
                "and the others plain tensors, whose gradients FSDP2 does not reduce across ranks: "
                "call fully_shard on the root module too (fully_shard(model) after its blocks), "
                "so every parameter is sharded"
            )
        first = dtensors[0]
        placements = {tuple(p.placements) for p in dtensors}  # type: ignore[attr-defined]
        same_mesh = all(p.device_mesh == first.device_mesh for p in dtensors)  # type: ignore[attr-defined]
        if not same_mesh or len(placements) > 1:
            raise ValueError(
                "the parameters are sharded on different device meshes or placements "
                f"({sorted(map(str, placements))}); flatlm supports FSDP2 (and HSDP) with one "
                "mesh for the whole model"
            )
        shard_dims = [
            i
            for i, placement in enumerate(first.placements)  # type: ignore[attr-defined]
            if isinstance(placement, Shard)
        ]
        if len(shard_dims) != 1:
            raise ValueError(
                f"parameters placed as {list(first.placements)} (mesh dims sharded: "  # type: ignore[attr-defined]
                f"{shard_dims}); flatlm supports FSDP2's one sharded mesh dimension (with an "
                "optional replicated one, HSDP), not tensor parallelism"
            )
        return cls(first.device_mesh.get_group(shard_dims[0]))  # type: ignore[attr-defined]

    @property
    def active(self) -> bool:
        return self.group is not None


class ShardingOf:
    """:meth:`Sharding.of` a parameter list, looked at again only when its tensors change
    (Accelerate's FSDP2 swaps DTensors into an optimizer built on the unsharded parameters)."""

    def __init__(self) -> None:
        self._of: tuple[tuple[int, ...], Sharding] | None = None

    def __call__(self, params: Sequence[Tensor]) -> Sharding:
        key = tuple(map(id, params))
        if self._of is None or self._of[0] != key:
            self._of = (key, Sharding.of(params))
        return self._of[1]


def _refuse_flat_parameters(params: Sequence[Tensor]) -> None:
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        return
    if any(isinstance(p, FlatParameter) for p in params):
        raise TypeError(
            "these parameters belong to FSDP1 (FullyShardedDataParallel, flat parameters), whose "
            "shards mix tensors and cannot be perturbed tensor by tensor: shard the model with "
            "FSDP2, torch.distributed.fsdp.fully_shard (docs/fsdp.md)"
        )


_CURRENT: ContextVar[Sharding | None] = ContextVar("flatlm_sharding", default=None)


@contextmanager
def reducing(sharding: Sharding) -> Iterator[None]:
    """Norms taken inside add their partial sums over ``sharding``'s group."""
    token = _CURRENT.set(sharding)
    try:
        yield
    finally:
        _CURRENT.reset(token)


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def over_shards(method: _Fn) -> _Fn:
    """An optimizer method inside which norms are over all shards of ``self.sharding``."""

    @wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with reducing(self.sharding):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def reduces() -> bool:
    """Whether norms taken now are over shards (inside :func:`reducing` of a sharded model)."""
    sharding = _CURRENT.get()
    return sharding is not None and sharding.active


def sum_over_shards(partial: Tensor) -> Tensor:
    """``partial`` summed over the ranks that share one copy of θ (one all-reduce, no host
    sync); unchanged outside :func:`reducing` or when nothing is sharded."""
    sharding = _CURRENT.get()
    if sharding is None or not sharding.active:
        return partial
    total = partial.clone()
    torch.distributed.all_reduce(total, group=sharding.group)
    return total


def sum_of_squares(tensors: Sequence[Tensor]) -> Tensor:
    """Σ of the squares of every element, this rank's part (in at least float32)."""
    norms = torch._foreach_norm(list(tensors), 2.0)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.stack([n.to(dtype) for n in norms]).square().sum()


def clip_grad_norm_(
    params: list[Tensor], max_norm: float | None, ok: Tensor, device: torch.device
) -> Tensor:
    """‖g‖ of the gradients of ``params``, scaled in place as ``torch.nn.utils.clip_grad_norm_``
    scales them (never up) when ``max_norm`` is set; over every shard inside :func:`reducing`
    of a sharded model, where a rank whose own loss was non-finite (``ok`` False) adds an
    infinite square, so every rank sees a non-finite norm and skips."""
    if not reduces():
        if max_norm is not None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    grads = [local(p.grad) for p in params if p.grad is not None]
    partial = sum_of_squares(grads) if grads else torch.zeros((), device=device)
    partial = partial + torch.where(ok.to(device), 0.0, float("inf"))
    grad_norm = sum_over_shards(partial).sqrt()
    if max_norm is not None and grads:
        coef = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return grad_norm


def gradient_sync(model: torch.nn.Module) -> Callable[[], AbstractContextManager[None]]:
    """FSDP2's counterpart of ``ddp_model.no_sync`` for ``step(..., no_sync=...)``: inside, the
    backward keeps unsharded gradients and skips the reduce-scatter (micro-batches reduce once,
    on the last)."""
    if not hasattr(model, "set_requires_gradient_sync"):
        raise TypeError(
            f"{type(model).__name__} is not an FSDP2 module (no set_requires_gradient_sync): "
            "pass the module fully_shard was called on"
        )

    @contextmanager
    def no_sync() -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    return no_sync
