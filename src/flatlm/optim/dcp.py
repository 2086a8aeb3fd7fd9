"""What ``step()`` without arguments does when ``torch.distributed.checkpoint`` calls it.

``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` first make sure the state exists
(torch's ``_init_optim_state``): when ``opt.state`` is empty and no parameter has a gradient,
they set every gradient to zeros and every ``lr`` to 0 and call ``step(closure=None)``.
``opt.state`` is a sharpness-aware optimizer's own state, empty for SAM at every step, so this
call comes for a trained optimizer too (after ``zero_grad``), and a real step then would move
AdamW's moments and count. :func:`is_state_init_call` recognises exactly that call (every ``lr``
0, every parameter that needs a gradient has a zero one); anything else is an ordinary call
without a forward, which the engine refuses.

:func:`init_state` creates each state entry a checkpoint of the optimizer holds, with its value
before a first step, and changes no parameter: the base optimizer's by torch's own zero step at
lr 0 (what ``_init_optim_state`` does to any optimizer), only if it has no state yet (a trained
one is left as it is); a stateful rule's state as zeros and the policy's stored tensors as zeros,
which the rule and the policy read as "none yet" (GA-SAM: EMA 0 at step 0).
``torch.distributed.checkpoint.load`` into a fresh optimizer then finds a place for every entry
of the checkpoint.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from flatlm.optim import sharded
from flatlm.optim.perturbation import Perturbation

__all__ = ["init_state", "is_state_init_call"]


def is_state_init_call(groups: list[dict[str, Any]]) -> bool:
    """Whether the gradients and learning rates are those ``_init_optim_state`` sets."""
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    if not params or any(p.grad is None for p in params):
        return False
    if any(float(g["lr"]) != 0.0 for g in groups if "lr" in g):
        return False
    return not any(bool(sharded.local(p.grad).any()) for p in params)  # type: ignore[arg-type]


@torch.no_grad()
def init_state(
    groups: list[dict[str, Any]],
    base_optimizer: torch.optim.Optimizer,
    state: MutableMapping[Tensor, dict[str, Any]],
    perturbation: Perturbation,
    stored: str | None,
) -> None:
    """Every entry a checkpoint holds, at its value before a first step (see the module);
    ``stored``: the key of the step policy's per-parameter tensors (None: none)."""
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    if not base_optimizer.state:  # a base with its own (bSAM's: s = s0, not one step's s)
        own = getattr(base_optimizer, "init_state", None)
        own() if callable(own) else base_optimizer.step()
    direction, geometry = perturbation.direction, perturbation.geometry
    if direction.stateful:  # the rule's keys, shapes and dtypes, from one zero input
        shards = sharded.locals_of(params)
        prepared = direction.prepare(
            shards, [torch.zeros_like(s) for s in shards], [{} for _ in params], geometry
        )
        for key, values in (prepared.new_state or {}).items():
            for p, value in zip(params, values, strict=True):
                state[p].setdefault(key, sharded.like_param(torch.zeros_like(value), p))
    if stored is not None:
        Perturbation.stored(state, params, stored)
