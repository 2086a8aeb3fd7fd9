"""Argument checks shared by the engine and the perturbation (each check once)."""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlm.optim import state_layout

__all__ = [
    "LIGHTNING_AUTOMATIC_OPTIMIZATION",
    "base_params",
    "check_base_hooks",
    "check_closure_origin",
    "check_dense",
    "check_distributed_mode",
    "check_gradient_rule",
    "check_group_rhos",
    "check_method",
    "check_one_pass_options",
    "check_options",
    "check_param_lists",
    "check_policy",
    "check_rho",
    "check_state_dict",
    "check_step_arguments",
    "flat_params",
    "require_classic_protocol",
    "require_clean_gradient",
    "require_policy_protocol",
]


def check_rho(rho: object) -> None:
    if (
        isinstance(rho, bool)
        or not isinstance(rho, (int, float))
        or not math.isfinite(rho)
        or rho < 0
    ):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def check_param_lists(params: list[Any]) -> None:
    """Refuse a parameter listed twice in one group: torch only warns, and then steps it twice
    per step (with SAM, perturbs it twice too). Across groups torch itself refuses."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    for i, group in enumerate(groups):
        items = group.get("params", []) if isinstance(group, dict) else []
        items = [items] if isinstance(items, torch.Tensor) else list(items)
        if isinstance(group, dict) and "params" in group:
            group["params"] = items  # a generator reads once: torch gets the list read here
        seen: set[int] = set()
        for p in items:
            p = p[1] if isinstance(p, tuple) else p  # (name, parameter) pairs
            if id(p) in seen:
                raise ValueError(
                    f"param_groups[{i}] lists a parameter of shape {tuple(p.shape)} twice: it "
                    "would be updated twice per step; list each parameter once"
                )
            seen.add(id(p))


def check_group_rhos(groups: list[dict[str, Any]]) -> None:
    for i, g in enumerate(groups):
        try:
            check_rho(g["rho"])
        except ValueError as e:
            raise ValueError(f"param_groups[{i}]: {e}") from None


def check_options(
    base_optimizer: Any,
    rho: float,
    functional: bool,
    ascent_steps: int,
    max_grad_norm: float | None,
    perturb_every: int,
    distributed: str,
    wrapper: type,
) -> None:
    """The engine's options; ``wrapper``: the engine's class, which cannot wrap itself."""
    check_rho(rho)
    if distributed not in ("sync", "local"):
        raise ValueError(f"distributed must be 'sync' or 'local', got {distributed!r}")
    cls = type(base_optimizer) if isinstance(base_optimizer, torch.optim.Optimizer) else None
    if cls is None and not (
        isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
    ):
        raise TypeError(
            "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW) or "
            f"an optimizer built from one, got {base_optimizer!r}"
        )
    cls = cls or base_optimizer
    if issubclass(cls, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS cannot be a base optimizer: it re-evaluates the loss through a closure inside "
            "its step, which would run at the restored point with the perturbed gradient; use a "
            "first-order optimizer such as torch.optim.AdamW"
        )
    if issubclass(cls, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam cannot be a base optimizer: it needs sparse gradients, and the "
            "perturbation is dense; use torch.optim.AdamW with dense gradients "
            "(nn.Embedding(sparse=False))"
        )
    if not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be an integer >= 1, got {ascent_steps!r}")
    if functional and ascent_steps > 1:
        raise ValueError("the functional methods take a single ascent step")
    if isinstance(perturb_every, bool) or not isinstance(perturb_every, int) or perturb_every < 1:
        raise ValueError(f"perturb_every must be an integer >= 1, got {perturb_every!r}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if issubclass(cls, wrapper):
        raise TypeError("base_optimizer cannot itself be a sharpness-aware optimizer")


def flat_params(params: Any) -> list[torch.Tensor]:
    """The tensors of a parameter list or of parameter groups."""
    out: list[torch.Tensor] = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out


def base_params(params: Any, base_optimizer: Any, base_kwargs: dict[str, Any], name: str) -> list:
    """The parameter groups to build on: ``params``, or an already-built base optimizer's own
    groups (then ``params`` must be None or the same tensors, and no base arguments given)."""
    if isinstance(base_optimizer, torch.optim.Optimizer):  # wrap an optimizer already built
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an already-built {type(base_optimizer).__name__}; its "
                f"arguments cannot be set here (got {sorted(base_kwargs)})"
            )
        own = base_optimizer.param_groups
        if params is not None and {id(p) for p in flat_params(params)} != {
            id(p) for g in own for p in g["params"]
        }:
            raise ValueError("params differ from the wrapped optimizer's; pass params=None")
        params = own
    elif params is None:
        raise TypeError("params is None: pass parameters, or a built optimizer to wrap")
    params = list(params)
    if not params:
        raise ValueError(f"{name} got an empty parameter list")
    check_param_lists(params)
    return params


def check_step_arguments(
    closure: Any, forward: Any, loss_fn: Any, micro_batches: Any, grad_scaler: Any, no_sync: Any
) -> None:
    """``step``'s arguments make one of its protocols."""
    if forward is not None:
        if closure is not None:
            raise TypeError("pass either closure or forward/loss_fn, not both")
        if loss_fn is None:
            raise TypeError("step(forward=...) also needs loss_fn=...")
    elif micro_batches is not None or grad_scaler is not None or no_sync is not None:
        raise TypeError("micro_batches, grad_scaler and no_sync need forward= and loss_fn=")


def check_method(
    direction: Any, geometry: Any, policy: Any, rule: Any, ascent_steps: int, distributed: str
) -> None:
    """The direction rule against the base optimizer's geometry; the step policy and the
    gradient rule against the options they cannot run with."""
    direction.validate(geometry)
    check_policy(policy, direction.needs_gradient, ascent_steps, distributed)
    check_gradient_rule(rule, policy, direction.needs_gradient, distributed)


def check_base_hooks(base: Any, noisy_pass: bool, rule: Any) -> None:
    """A noisy clean pass needs a base optimizer that draws the noise, and a rule that hands the
    clean gradient to the base optimizer needs one that takes it (bSAM's
    :class:`~flatlm.optim.bsam.BSAMBase` does both)."""
    if noisy_pass and not callable(getattr(base, "draw_noise", None)):
        raise TypeError(
            f"noisy_pass=True needs a base optimizer that draws the weight noise (draw_noise), "
            f"which {type(base).__name__} does not: use flatlm.optim.BSAMBase"
        )
    if getattr(rule, "hands_clean_to_base", False) and not hasattr(base, "noisy_grads"):
        raise TypeError(
            f"{type(rule).__name__} hands the clean gradient to the base optimizer, which "
            f"{type(base).__name__} does not take (noisy_grads): use flatlm.optim.BSAMBase"
        )


def check_policy(policy: Any, needs_gradient: bool, ascent_steps: int, distributed: str) -> None:
    """The step policy and the options it cannot run with; :func:`check_one_pass_options` for a
    rule that needs no clean gradient."""
    if policy.name in ("looksam", "aesam") and distributed == "local":
        raise ValueError(
            f"policy {policy.name} needs the all-reduced clean gradient on every rank (each rank "
            "must decide and update alike): use distributed='sync'"
        )
    if not needs_gradient:
        check_one_pass_options(ascent_steps, policy, distributed)


def check_gradient_rule(rule: Any, policy: Any, needs_gradient: bool, distributed: str) -> None:
    """A gradient rule (WSAM, GSAM) combines a fresh step's clean and perturbed gradients: the
    step policies whose steps in between have no such pair, and the modes without a clean
    gradient shared by every rank, cannot run it."""
    if rule is None:
        return
    rule.validate()
    if policy.reuses is not None:
        raise ValueError(
            f"step policy {policy.name} reuses a stored perturbation between fresh steps, which "
            f"gives no clean and perturbed gradient pair for {type(rule).__name__} to combine: "
            "use every_step, interval, aesam or rst"
        )
    if not needs_gradient or distributed == "local":
        raise ValueError(
            f"{type(rule).__name__} combines the all-reduced clean gradient with the perturbed "
            "one: it needs a direction rule that reads the gradient and distributed='sync'"
        )


def check_one_pass_options(ascent_steps: int, policy: Any, distributed: str) -> None:
    """A rule that needs no clean gradient (the momentum methods) runs one gradient pass a step
    already; the options that trade or spend clean backward passes mean nothing for it."""
    if not policy.every_step:
        raise ValueError(
            f"step policy {policy.name} trades or decides on the clean backward, and this method "
            "(ε along the momentum) runs none: it costs one gradient pass every step already. "
            "Leave perturb_every at 1 and policy unset (ρ = 0 still gives plain steps)"
        )
    if ascent_steps > 1:
        raise ValueError(
            "ascent_steps > 1 ascends along gradients at intermediate points, which this method "
            "(ε along the momentum, one gradient pass a step) never computes: use ascent_steps=1"
        )
    if distributed == "local":
        raise ValueError(
            "distributed='local' makes ε from each rank's own clean gradient; this method makes "
            "it from the momentum, which is the same on every rank: use distributed='sync'"
        )


_NOT_STEPPING = object()


def check_distributed_mode(
    distributed: str, *, sharded: bool, scaler: bool = False, no_sync: Any = _NOT_STEPPING
) -> None:
    """The combinations of ``distributed``, FSDP2, fp16 and (in ``step``) ``no_sync`` that
    cannot run."""
    if distributed == "local" and no_sync is None:
        raise ValueError(
            "distributed='local' perturbs with each rank's own gradient: pass "
            "step(..., no_sync=ddp_model.no_sync) so the clean pass skips the all-reduce"
        )
    if distributed == "local" and sharded:
        raise ValueError(
            "distributed='local' needs each rank's own full gradient, which FSDP2 never "
            "holds (it reduce-scatters): use distributed='sync'"
        )
    if scaler and sharded:
        raise ValueError(
            "grad_scaler (fp16 loss scaling) is not supported with FSDP2-sharded parameters: "
            "train in bf16 with fully_shard(..., mp_policy=MixedPrecisionPolicy("
            "param_dtype=torch.bfloat16)) or torch.autocast(dtype=torch.bfloat16), which "
            "need no scaler"
        )


def require_classic_protocol(functional: bool, name: str, what: str) -> None:
    """The functional methods need the clean pass's dlogits, which ``what`` cannot see."""
    if functional:
        raise RuntimeError(
            f"{name} needs the clean pass's dlogits, which {what} cannot "
            "see: use step(forward=lambda: model(x), loss_fn=...)"
        )


def require_policy_protocol(policy: Any, what: str) -> None:
    """``perturb_every``'s reuse skips the clean backward, which the classic protocols have
    already run (the other policies decide on, or reuse with, the caller's clean gradient)."""
    if policy.reuses == "direction":
        raise RuntimeError(
            f"perturb_every > 1 saves the clean backward, which {what} has already run: use "
            "step(forward=lambda: model(x), loss_fn=...)"
        )


def require_clean_gradient(grads: list[torch.Tensor], what: str) -> None:
    if not grads:
        raise RuntimeError(
            f"{what} found no gradient on any parameter: this protocol perturbs along the "
            "gradient of a clean backward you have already run (loss = closure() or "
            f"loss.backward(), then opt.{what.split('(')[0]}(...)); to run both passes in one "
            "call use step(forward=lambda: model(x), loss_fn=...)"
        )


def check_dense(params: list[torch.Tensor]) -> None:
    """The perturbation is dense: refuse sparse gradients before anything moves."""
    for i, p in enumerate(params):
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError(
                f"parameter {i} (shape {tuple(p.shape)}) has a sparse gradient: flatlm's methods "
                "perturb and step dense tensors; build the embedding with nn.Embedding(..., "
                "sparse=False)"
            )


def check_state_dict(
    state_dict: Any, method: str, groups: list[dict[str, Any]] | None = None
) -> None:
    """A state dict of ``method`` in torch's layout (or flatlm 0.2's, see
    :mod:`~flatlm.optim.state_layout`) that fits ``groups`` (the optimizer's own: the same number
    of groups and parameters, every per-parameter tensor of its parameter's shape), else a
    ValueError saying what it is instead. Checked before anything is loaded."""
    legacy = isinstance(state_dict, dict) and state_layout.is_legacy(state_dict)
    if not legacy and not (
        isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)
    ):
        got = (
            f"keys {sorted(map(str, state_dict))[:8]}"
            if isinstance(state_dict, dict)
            else f"a {type(state_dict).__name__}"
        )
        raise ValueError(
            f"not a {method} state dict: expected torch's optimizer layout, keys 'state' and "
            f"'param_groups' (or flatlm 0.2's 'base' and 'method_state'), got {got}"
        )
    if legacy:
        base = state_dict["base"]
        if not (isinstance(base, dict) and {"state", "param_groups"} <= set(base)):
            raise ValueError(f"malformed {method} state dict: 'base' lacks 'state'/'param_groups'")
        sections = [(base["state"], "base optimizer"), (state_dict["method_state"], "method")]
    else:
        base = state_dict
        sections = [(base["state"], "")]
    if not all(isinstance(section, dict) for section, _ in sections):
        raise ValueError(f"malformed {method} state dict: per-parameter state is not a dict")
    saved_groups = base["param_groups"]
    try:
        saved_ids = [list(g["params"]) for g in saved_groups]
    except (TypeError, KeyError):
        raise ValueError(f"malformed {method} state dict: bad 'param_groups'") from None
    if not legacy:
        _check_flatlm_entries(saved_groups, method)
    saved = state_layout.method_of(state_dict)
    if saved is not None and saved != method:
        raise ValueError(f"state dict is for {saved}, cannot load it into {method}")
    if groups is None:
        return
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(ids) for ids in saved_ids]
    if saved_sizes != sizes:
        raise ValueError(
            f"the state dict has parameter groups of sizes {saved_sizes}, this optimizer "
            f"{sizes}: it was saved for another model or grouping"
        )
    # A state's key is its parameter's entry in the saved groups' "params": an index as
    # state_dict() writes it, or a parameter name after torch.distributed.checkpoint.
    try:
        position = {key: i for i, key in enumerate(k for ids in saved_ids for k in ids)}
    except TypeError:
        raise ValueError(f"malformed {method} state dict: bad 'param_groups'") from None
    params = [p for g in groups for p in g["params"]]
    for section, name in sections:
        for key, entry in section.items():
            index = position.get(key) if _hashable(key) else None
            if index is None or not (entry is None or isinstance(entry, dict)):
                raise ValueError(
                    f"malformed {method} state dict: {name + ' ' if name else ''}state for "
                    f"{key!r}, which no parameter group lists"
                    + ("" if index is None else " (and not a dict)")
                )
            for state_key, value in (entry or {}).items():
                shape = tuple(params[index].shape)
                if torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) != shape:
                    raise ValueError(
                        f"the state dict's {name + ' ' if name else ''}state {state_key!r} of "
                        f"parameter {key!r} has shape {tuple(value.shape)}, the parameter "
                        f"{shape}: it was saved for another model"
                    )


def _check_flatlm_entries(saved_groups: list[Any], method: str) -> None:
    """Every group of torch's layout carries flatlm's optimizer-wide values."""
    names = [state_layout.PREFIX + name for name in state_layout.SCALARS]
    for i, group in enumerate(saved_groups):
        if names[0] not in group:
            raise ValueError(
                f"not a {method} state dict: param_groups[{i}] has no {names[0]!r}, so a flatlm "
                "optimizer did not write it (a plain torch optimizer's state dict loads into "
                "opt.base_optimizer; torch.distributed.checkpoint's "
                "flatten_optimizer_state_dict=True drops these entries and is not supported)"
            )
        missing = [name for name in names if name not in group]
        if missing:
            raise ValueError(
                f"malformed {method} state dict: param_groups[{i}] lacks {missing} (flatlm's "
                "optimizer-wide values, in every group): it was written by something else or "
                "edited; save it again with state_dict()"
            )


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


LIGHTNING_AUTOMATIC_OPTIMIZATION = (
    "a sharpness-aware optimizer cannot run under Lightning's automatic optimization: Lightning "
    "hands it a closure that runs training_step and the backward, so it can neither run the "
    "two passes itself nor see the clean pass's dlogits, and the step would be wrong. Use manual "
    "optimization: set self.automatic_optimization = False (SharpnessAwareMixin does, first in "
    "the bases: class LitModel(SharpnessAwareMixin, pl.LightningModule)) and call "
    "flatlm.integrations.lightning.sharpness_aware_step(self, forward=..., loss_fn=...) in "
    "training_step; see docs/lightning.md"
)


def _lightning_module(name: str) -> bool:
    return name.split(".")[0] in ("pytorch_lightning", "lightning")


def check_closure_origin(closure: Any) -> None:
    """Refuse a closure made by Lightning's automatic optimization (its precision plugin wraps
    ``training_step`` and the backward in a ``functools.partial`` of one of its methods)."""
    func = getattr(closure, "func", closure)
    owner = getattr(func, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(func, "__module__", "")
    if _lightning_module(module or ""):
        raise RuntimeError(LIGHTNING_AUTOMATIC_OPTIMIZATION)


def lightning_hint() -> str:
    """A pointer to the Lightning integration when Lightning is in use (it calls ``step()``
    without arguments under 16-bit precision), else nothing."""
    import sys

    if any(_lightning_module(m) for m in ("pytorch_lightning", "lightning") if m in sys.modules):
        return " (under Lightning: " + LIGHTNING_AUTOMATIC_OPTIMIZATION + ")"
    return ""
