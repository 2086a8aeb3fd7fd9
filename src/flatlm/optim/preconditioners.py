"""What the direction rules may read from the base optimizer, behind one small interface.

A rule never sees the base optimizer itself: it gets a :class:`BaseGeometry`, which answers
"what is your preconditioner P for these parameters" (and, for rules that need it, "what is your
momentum"). How P is read from a given optimizer class is a registered function, so a new base
optimizer is taught to flatlm with :func:`register_preconditioner`, not by editing a rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flatlm.optim.sharded import local

__all__ = [
    "BaseGeometry",
    "PreconditionerFn",
    "adam_preconditioner",
    "bias_corrections",
    "find_preconditioner",
    "known_momenta",
    "known_preconditioners",
    "register_momentum",
    "register_preconditioner",
]

#: ``fn(base_optimizer, params, grads) -> list[Tensor | None]``: P per parameter. With ``grads``
#: (this step's clean gradients) P is the denominator of this step's update, with the gradient
#: folded into the second moment; with ``grads=None`` it is the previous step's (None where the
#: base optimizer has no state yet: P = I there). Under FSDP2 ``params`` and ``grads`` are this
#: rank's shards (``flatlm.optim.sharded.local`` of the base optimizer's parameters and state).
PreconditionerFn = Callable[
    [torch.optim.Optimizer, list[Tensor], list[Tensor] | None], list[Tensor | None]
]
_PRECONDITIONERS: dict[type[torch.optim.Optimizer], PreconditionerFn] = {}


def bias_corrections(beta: float, steps: list[Tensor]) -> list[Tensor]:
    """1 − βᵗ for each step-count tensor, in float64 as Adam computes it, without a host sync."""
    t = torch.stack(steps).to(torch.float64)
    return list((1.0 - torch.pow(beta, t)).unbind())


def register_preconditioner(optimizer_cls: type[torch.optim.Optimizer], fn: PreconditionerFn):
    """Teach the preconditioned methods to read P from another base optimizer class."""
    _PRECONDITIONERS[optimizer_cls] = fn


def find_preconditioner(optimizer_cls: type) -> PreconditionerFn | None:
    for cls in getattr(optimizer_cls, "__mro__", ()):
        if cls in _PRECONDITIONERS:
            return _PRECONDITIONERS[cls]
    return None


def known_preconditioners() -> list[str]:
    return sorted(c.__name__ for c in _PRECONDITIONERS)


@torch.no_grad()
def adam_preconditioner(
    base: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor] | None = None
) -> list[Tensor | None]:
    """P = √v̂ + eps, the denominator Adam/AdamW divide by, v̂ = v / (1 − β₂ᵗ).

    With ``grads``: this step's, v = β₂v + (1 − β₂)g² bias-corrected for step t + 1 (from v = 0,
    t = 0 for a parameter without state), so |P⁻¹g| ≤ √(1 − β₂ᵗ⁺¹)/√(1 − β₂) per coordinate
    and every parameter with a gradient has a P. Without: the previous step's, None where the
    parameter has no state yet. With ``amsgrad`` the running maximum of v, as Adam divides by it.
    """
    out: list[Tensor | None] = [None] * len(params)
    index = {p: i for i, p in enumerate(params)}  # keyed by shard: local(p) is p unsharded
    for group in base.param_groups:
        beta2 = float(group["betas"][1])
        eps = float(group["eps"])
        amsgrad = group.get("amsgrad", False)
        key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        idx, second_moments, steps, maxima = [], [], [], []
        for p in group["params"]:
            i = index.get(local(p))
            if i is None:
                continue
            state = base.state.get(p)
            if state and (key not in state or "step" not in state):
                raise KeyError(
                    f"{type(base).__name__} has state for a parameter but no {key!r}/'step' in "
                    f"it (keys: {sorted(state)}), so flatlm cannot read its preconditioner; "
                    "register one for this class with flatlm.optim.register_preconditioner"
                )
            if not state:
                if grads is None:
                    continue  # previous moment: none yet, P = I
                on_device = group.get("fused") or group.get("capturable")  # where Adam keeps it
                step = torch.zeros((), device=p.device if on_device else "cpu")
                state = {"exp_avg_sq": torch.zeros_like(local(p)), "step": step}
                if amsgrad:
                    state["max_exp_avg_sq"] = state["exp_avg_sq"]
            idx.append(i)
            second_moments.append(local(state["exp_avg_sq" if grads is not None else key]))
            steps.append(local(state["step"]))
            maxima.append(local(state["max_exp_avg_sq"]) if amsgrad else None)
        if not idx:
            continue
        if grads is None:
            precond = torch._foreach_div(second_moments, bias_corrections(beta2, steps))
        else:
            g = [grads[i] for i in idx]
            moment = torch._foreach_mul(second_moments, beta2)
            torch._foreach_addcmul_(moment, g, g, value=1.0 - beta2)
            if amsgrad:
                torch._foreach_maximum_(moment, maxima)
            precond = torch._foreach_div(
                moment, bias_corrections(beta2, torch._foreach_add(steps, 1.0))
            )
        torch._foreach_sqrt_(precond)
        torch._foreach_add_(precond, eps)
        for i, pc in zip(idx, precond, strict=True):
            out[i] = pc
    return out


register_preconditioner(torch.optim.Adam, adam_preconditioner)
register_preconditioner(torch.optim.AdamW, adam_preconditioner)
register_preconditioner(torch.optim.NAdam, adam_preconditioner)
# Not RAdam: it divides by nothing while its variance estimate is untrusted (the first steps) and
# by √v̂ with a rescaled eps after, so Adam's P would not be what it steps with.


#: Where a base optimizer keeps its momentum, an average (or sum) of past gradients in the
#: gradient's own orientation, by optimizer class: the state key it is saved under.
_MOMENTUM_KEYS: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.Adam: "exp_avg",
    torch.optim.AdamW: "exp_avg",
    torch.optim.NAdam: "exp_avg",
    torch.optim.RAdam: "exp_avg",
    torch.optim.Adamax: "exp_avg",
    torch.optim.SGD: "momentum_buffer",
}


def register_momentum(optimizer_cls: type[torch.optim.Optimizer], state_key: str) -> None:
    """Teach the momentum methods (``msam`` …) where ``optimizer_cls`` keeps its momentum: the
    per-parameter state key of an average of past gradients, oriented like the gradient."""
    _MOMENTUM_KEYS[optimizer_cls] = state_key


def _find_momentum_key(optimizer_cls: type) -> str | None:
    for cls in getattr(optimizer_cls, "__mro__", ()):
        if cls in _MOMENTUM_KEYS:
            return _MOMENTUM_KEYS[cls]
    return None


def known_momenta() -> list[str]:
    return sorted(c.__name__ for c in _MOMENTUM_KEYS)


class BaseGeometry:
    """The base optimizer's geometry as the direction rules see it (read-only)."""

    def __init__(self, base: torch.optim.Optimizer):
        self._base = base
        self._preconditioner = find_preconditioner(type(base))

    @property
    def base_name(self) -> str:
        return type(self._base).__name__

    @property
    def has_preconditioner(self) -> bool:
        return self._preconditioner is not None

    @property
    def momentum_key(self) -> str | None:
        """The state key of the base optimizer's momentum (None: flatlm knows of none)."""
        return _find_momentum_key(type(self._base))

    def momentum(self, params: list[Tensor]) -> list[Tensor | None]:
        """The base optimizer's momentum m per parameter (or per shard under FSDP2) as it stands
        before this step (its own tensors: read them, never write), None where the parameter has
        none yet."""
        key = self.momentum_key
        if key is None:
            raise TypeError(f"{self.base_name} keeps no momentum flatlm can read")
        state = self._base.state
        by_shard = {local(p): p for g in self._base.param_groups for p in g["params"]}
        out: list[Tensor | None] = []
        for shard in params:
            st = state.get(by_shard.get(shard, shard))
            m = st.get(key) if st else None
            out.append(None if m is None else local(m))
        return out

    def groups_without_momentum(self) -> list[int]:
        """Indices of groups that can never have momentum (SGD with ``momentum=0``)."""
        if self.momentum_key != "momentum_buffer":
            return []
        return [i for i, g in enumerate(self._base.param_groups) if not g.get("momentum")]

    def preconditioner(
        self, params: list[Tensor], grads: list[Tensor] | None = None
    ) -> list[Tensor | None]:
        """P per parameter: this step's with ``grads``, else the previous step's (None where
        there is no state yet, P = I there)."""
        if self._preconditioner is None:
            raise TypeError(f"{self.base_name} has no preconditioner flatlm can read")
        return self._preconditioner(self._base, params, grads)
