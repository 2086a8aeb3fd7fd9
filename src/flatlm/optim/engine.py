"""The perturbation engine shared by every sharpness-aware method in flatlm.

One step (see docs/algorithms.md and docs/architecture.md):

1. clean pass at θ: loss L, gradient g (and, for the functional methods, r = ∂ℓ/∂logits)
   — :mod:`~flatlm.optim.passes`;
2. ε from g by the method's *direction rule* (:mod:`~flatlm.optim.directions`), scaled to
   radius ρ per parameter group — :mod:`~flatlm.optim.perturbation`;
3. second pass at θ + ε: the full loss gradient ∇L(θ+ε), or for the functional methods the
   vector–Jacobian product J(θ+ε)ᵀ r(θ) — :mod:`~flatlm.optim.passes`;
4. θ restored bit for bit from a copy (never by subtracting ε), the base optimizer steps, or
   the whole step is skipped if anything was non-finite (:mod:`~flatlm.optim.amp` for fp16).

A method is therefore a direction rule plus one flag (``functional``), not a class of its own.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import Tensor

from flatlm.optim import amp, passes, sharded, state_layout
from flatlm.optim.directions import Direction, global_norm, sum_of_squares
from flatlm.optim.perturbation import Perturbation, ReuseSchedule
from flatlm.optim.preconditioners import BaseGeometry
from flatlm.optim.validation import (
    check_closure_origin,
    check_options,
    check_rho,
    check_state_dict,
    lightning_hint,
)

__all__ = ["NonFiniteStepWarning", "SharpnessAwareOptimizer"]


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because a pass gave a non-finite loss or gradient."""


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _over_shards(method: _Fn) -> _Fn:
    """Norms taken inside this method are over all shards when θ is FSDP2-sharded."""

    @functools.wraps(method)
    def wrapper(self: SharpnessAwareOptimizer, *args: Any, **kwargs: Any) -> Any:
        with sharded.reducing(self.sharding):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; ``direction`` and ``functional`` define the method.

    ``param_groups`` is the base optimizer's own list (LR schedulers work on either object) with
    this optimizer's keys (``rho`` …) added; changing ``group["rho"]`` takes effect next step.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: the wrapped optimizer's class (AdamW by default), built on the same groups
            with ``base_kwargs``; or an optimizer already built (params then None), whose groups
            and state are used as they are.
        rho: perturbation radius ρ ≥ 0.
        direction: the rule that makes ε's direction (see :mod:`flatlm.optim.directions`).
        functional: take J(θ+ε)ᵀ r(θ) at the perturbed point instead of ∇L(θ+ε).
        ascent_steps: K normalised ascent steps of size ρ/K (each in the corruption set's own
            norm, so their sum stays in the set), the descent gradient taken at the last point.
        max_grad_norm: clip the gradient handed to the base optimizer (the perturbed one).
        perturb_every: make a fresh ε only every k-th step (as LookSAM and composer's SAM
            ``interval`` save compute). The steps in between reuse the last ε's direction (its
            unit direction, times the group's current ρ) and skip the clean backward: one
            forward–backward at θ + ε for SAM/PSAM/GA-SAM (the returned loss is then L(θ+ε)),
            a no-grad clean forward for r(θ) plus one forward–backward for the functional
            methods. Costs one more parameter copy (the stored direction, saved in
            ``state_dict``); GA-SAM's gradient-strength EMA only sees the clean gradients.
        replay_rng: replay the clean pass's CPU/CUDA RNG state for the second pass, so dropout
            masks match and both passes evaluate one function.
        skip_nonfinite: skip the whole step (θ and all state unchanged) when a pass gives a
            non-finite loss or gradient. Deciding that costs one host read of a flag per step,
            unless the base optimizer can skip on device (``fused=True`` Adam/AdamW/SGD), which
            flatlm then uses, with no host sync at all.
        distributed: with DistributedDataParallel, ``"sync"`` (default) makes ε from the
            all-reduced clean gradient, so N ranks equal one process on the global batch;
            ``"local"`` makes it from each rank's own gradient (SAM's m-sharpness) and needs
            ``step(..., no_sync=ddp_model.no_sync)``. Either way the norms need no all-reduce of
            their own: in sync mode every rank holds the same gradient. With FSDP2
            (``fully_shard``) each rank perturbs and restores its own shard and the norms add
            their squares over the shard group (one scalar all-reduce each; docs/fsdp.md);
            micro-batches take ``no_sync=flatlm.optim.gradient_sync(model)``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        rho: float,
        direction: Direction,
        functional: bool = False,
        ascent_steps: int = 1,
        max_grad_norm: float | None = None,
        perturb_every: int = 1,
        replay_rng: bool = True,
        skip_nonfinite: bool = True,
        distributed: str = "sync",
        **base_kwargs: Any,
    ):
        check_options(
            base_optimizer, rho, functional, ascent_steps, max_grad_norm, perturb_every, distributed
        )
        if isinstance(base_optimizer, SharpnessAwareOptimizer) or (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, SharpnessAwareOptimizer)
        ):
            raise TypeError("base_optimizer cannot itself be a sharpness-aware optimizer")
        if isinstance(base_optimizer, torch.optim.Optimizer):  # wrap an optimizer already built
            base = base_optimizer
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is an already-built {type(base).__name__}; its arguments "
                    f"cannot be set here (got {sorted(base_kwargs)})"
                )
            if params is not None and {id(p) for p in _flat(params)} != {
                id(p) for g in base.param_groups for p in g["params"]
            }:
                raise ValueError("params differ from the wrapped optimizer's; pass params=None")
            params = base.param_groups
        elif params is None:
            raise TypeError("params is None: pass parameters, or a built optimizer to wrap")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        super().__init__(params, {"rho": rho})
        if isinstance(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of groups for both objects: schedulers and users see a single source of truth.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

        self.direction = direction
        self.functional = functional
        self.ascent_steps = ascent_steps
        self.max_grad_norm = max_grad_norm
        self.perturb_every = perturb_every
        self.replay_rng = replay_rng
        self.skip_nonfinite = skip_nonfinite
        self.distributed = distributed
        self._sharding_of: tuple[tuple[int, ...], sharded.Sharding] | None = None
        self.sharding  # noqa: B018 (checks the parameters now)
        geometry = BaseGeometry(self.base_optimizer)
        direction.validate(geometry)
        if not direction.needs_gradient:
            _check_one_pass_options(ascent_steps, perturb_every, distributed)
        self._perturbation = Perturbation(
            direction, geometry, ascent_steps=ascent_steps, keep_direction=perturb_every > 1
        )
        self._skipped_host = 0
        self._skipped_device: Tensor | None = None
        self._schedule = ReuseSchedule(perturb_every)
        self._last_step_taken: bool | None = None
        self._graph_checked = False  # the functional methods' loss graph, checked once

    # --- public protocol --------------------------------------------------------------------

    @_over_shards
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        forward: Callable[..., Tensor] | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        micro_batches: Sequence[Any] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        no_sync: Callable[[], AbstractContextManager] | None = None,
    ) -> Tensor | None:
        """One full step.

        ``step(forward=..., loss_fn=...)``: ``forward()`` returns the logits and ``loss_fn`` maps
        them to the scalar loss; both passes run here. Returns the clean loss (a tensor).

        With ``micro_batches=[mb, ...]`` (gradient accumulation) it calls ``forward(mb)`` and
        ``loss_fn(logits, mb)`` for each, weights each loss by 1/M, makes ε from the accumulated
        clean gradient and accumulates the second pass over the same micro-batches (each with its
        own dlogits and RNG state). With equal-sized micro-batches and mean losses this equals one
        step on the concatenated batch. Returns the mean clean loss.

        ``grad_scaler``: fp16 with ``torch.amp.GradScaler``. Both passes' losses are scaled, both
        passes' gradients unscaled (ε is made from unscaled gradients), an overflow in either
        pass skips the whole step (θ and state unchanged, counted in ``skipped_steps``, no
        warning), and ``grad_scaler.update()`` is called here: do not call ``scaler.step`` or
        ``scaler.update`` yourself.

        ``no_sync``: a DDP model's ``no_sync``. With it, micro-batches all-reduce only once per
        pass, and ``distributed="local"`` keeps the clean pass local (forward and backward).

        ``step(closure)``: the davda54/sam protocol. The caller has already run the clean
        forward and backward; ``closure`` recomputes loss and gradient (forward + backward) and
        is called at the perturbed point. Returns the closure's (perturbed) loss.

        A momentum method (``msam``; ``mfsam``/``mpfsam`` need ``forward=``) runs no clean
        backward: ``step(forward=...)`` returns L(θ+ε) for ``msam`` and the clean loss of a
        no-grad forward for the functional ones; ``step(closure)`` needs no gradient beforehand
        and calls the closure once, at θ + ε.
        """
        if forward is not None:
            if closure is not None:
                raise TypeError("pass either closure or forward/loss_fn, not both")
            if loss_fn is None:
                raise TypeError("step(forward=...) also needs loss_fn=...")
            micro = passes.micro_batches_of(forward, loss_fn, micro_batches)
            return self._forward_step(micro, grad_scaler, no_sync)
        if micro_batches is not None or grad_scaler is not None or no_sync is not None:
            raise TypeError("micro_batches, grad_scaler and no_sync need forward= and loss_fn=")
        if closure is None:
            if self._init_checkpoint_state():  # torch.distributed.checkpoint's state init
                return None
            raise TypeError(
                f"{type(self).__name__}.step needs forward= and loss_fn= (or a closure that "
                "recomputes the loss and its gradient)" + lightning_hint()
            )
        check_closure_origin(closure)
        self._require_classic_protocol("step(closure)")
        self._require_fresh_every_step("step(closure)")
        if self.direction.needs_gradient:
            self._require_clean_gradient("step(closure)")
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            for k in range(self.ascent_steps):
                self._perturbation.ascend(self.param_groups, self.state, first=k == 0)
                self.zero_grad(set_to_none=True)
                loss = closure()
        except BaseException:
            self.abort_step()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    @_over_shards
    def first_step(self, zero_grad: bool = False, *, functional_vjp: bool = False) -> None:
        """Move θ to θ + ε using the gradient the caller's backward left in ``p.grad``.

        The functional methods refuse this protocol unless ``functional_vjp=True``: the caller
        then promises to run the second pass as ``logits.backward(r)`` with the clean pass's
        dlogits r (:func:`flatlm.optim.passes.vjp`; integrations that own the loop do).

        ``msam`` perturbs along the momentum and reads no gradient: call ``first_step()`` before
        the step's only backward (``first_step(); loss(model(x)).backward(); second_step()``).
        """
        if not functional_vjp:
            self._require_classic_protocol("first_step()")
        self._require_fresh_every_step("first_step()")
        if self.ascent_steps > 1:
            raise RuntimeError("ascent_steps > 1 needs step(closure) or step(forward=, loss_fn=)")
        if self.direction.needs_gradient:
            self._require_clean_gradient("first_step()")
        self._perturbation.ascend(self.param_groups, self.state, first=True)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    @_over_shards
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore θ exactly and step the base optimizer with the gradient now in ``p.grad``."""
        self._descend(warn=True)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a started step: θ copied back (bit for bit), nothing stepped; a no-op when no
        step is under way. ``step`` calls it when a pass raises; two-phase loops should too."""
        self._perturbation.abort()

    @torch.no_grad()
    @_over_shards
    def perturbation(self) -> list[Tensor | None]:
        """The method's ε per parameter of ``param_groups`` from the gradients now in ``p.grad``.

        Changes nothing (θ, gradients, state); None where a parameter has no gradient.
        """
        by_param = self._perturbation.epsilon(self.param_groups, self.state)
        return [by_param.get(p) for group in self.param_groups for p in group["params"]]

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient."""
        device = 0 if self._skipped_device is None else int(self._skipped_device.item())
        return self._skipped_host + device

    def extra_bytes(self) -> int:
        """Bytes held between steps beyond the base optimizer's state: the clean copy of θ and
        the method's own state (GA-SAM's EMA, perturb_every's stored direction); this rank's
        shards under FSDP2."""
        tensors = [*self._perturbation.clean_copies.values()]
        tensors += [
            sharded.local(t)
            for st in self.state.values()
            for t in st.values()
            if torch.is_tensor(t)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def perturbation_norm(self) -> Tensor | None:
        """‖ε‖ of the last fresh perturbation (a 0-dim tensor; reading it as a number syncs).

        Recorded only after ``record_perturbation_norm = True`` (one more norm per step)."""
        return self._perturbation.last_norm

    @property
    def record_perturbation_norm(self) -> bool:
        return self._perturbation.record_norm

    @record_perturbation_norm.setter
    def record_perturbation_norm(self, value: bool) -> None:
        self._perturbation.record_norm = bool(value)

    @property
    def skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped on the device, with no host sync at all: a fused
        Adam/AdamW/SGD base and a rule that keeps no state of its own."""
        return (
            not self.direction.stateful
            and not self.sharding.active
            and amp.can_skip_on_device(self.base_optimizer, self.param_groups)
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        check_rho(param_group.setdefault("rho", self.defaults["rho"]))
        self.base_optimizer.add_param_group(param_group)

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer layout, which ``torch.distributed.checkpoint`` reads and reshards
        like any optimizer's (:mod:`~flatlm.optim.state_layout`): ``state`` by parameter index,
        each entry the base optimizer's (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``) with this
        method's own merged in under ``flatlm_`` keys (GA-SAM's ``flatlm_grad_sq_ema``,
        ``perturb_every``'s ``flatlm_perturb_direction``); ``param_groups`` with
        ``flatlm_method``, ``flatlm_skipped_steps`` and ``flatlm_steps_since_fresh_perturbation``
        in every group."""
        return state_layout.to_standard(
            self.base_optimizer.state_dict(),
            super().state_dict()["state"],
            state_layout.Scalars(
                type(self).__name__, self.skipped_steps, self._schedule.since_fresh
            ),
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``: torch's layout, keyed by index or (from
        ``torch.distributed.checkpoint``) by parameter name, or flatlm 0.2's layout."""
        check_state_dict(state_dict, type(self).__name__, self.param_groups)
        parts = state_layout.split(state_dict)  # flatlm's group entries are left out of both
        self.base_optimizer.load_state_dict(parts.base)
        # Load our own state against the base's (now loaded) groups, then share them again.
        super().load_state_dict(
            {"state": parts.method_state, "param_groups": parts.base["param_groups"]}
        )
        self.param_groups = self.base_optimizer.param_groups
        self._skipped_host = parts.scalars.skipped_steps
        self._skipped_device = None
        self._schedule.load(parts.scalars.steps_since_fresh_perturbation)
        if self.perturb_every == 1:  # a direction saved with perturb_every > 1 is not used here
            Perturbation.drop_stored(self.state)

    @torch.no_grad()
    def _init_checkpoint_state(self) -> bool:
        """What ``step()`` without arguments does when ``torch.distributed.checkpoint`` calls it.

        ``get_optimizer_state_dict`` and ``set_optimizer_state_dict`` first make sure the state
        exists (torch's ``_init_optim_state``): when ``opt.state`` is empty and no parameter has a
        gradient, they set every gradient to zeros and every ``lr`` to 0 and call
        ``step(closure=None)``. ``opt.state`` is this method's own state, empty for SAM at every
        step, so this call comes for a trained optimizer too (after ``zero_grad``), and a real
        step then would move AdamW's moments and count. Recognised by exactly that call (every
        ``lr`` 0, every parameter that needs a gradient has a zero one); anything else returns
        False and ``step`` raises as for any call without a forward.

        It creates each state entry a checkpoint of this optimizer holds, with its value before
        a first step, and changes no parameter: the base optimizer's by torch's own zero step at
        lr 0 (what ``_init_optim_state`` does to any optimizer), only if it has no state yet (a
        trained one is left as it is); a stateful rule's state as zeros and ``perturb_every``'s
        stored direction as zeros, which the rule and the schedule read as "none yet" (GA-SAM:
        EMA 0 at step 0). ``torch.distributed.checkpoint.load`` into a fresh optimizer then
        finds a place for every entry of the checkpoint.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not params or any(p.grad is None for p in params):
            return False
        if any(float(g["lr"]) != 0.0 for g in self.param_groups if "lr" in g):
            return False
        if any(bool(sharded.local(p.grad).any()) for p in params):  # type: ignore[arg-type]
            return False
        if not self.base_optimizer.state:
            self.base_optimizer.step()
        if self.direction.stateful:  # the rule's keys, shapes and dtypes, from one zero input
            shards = sharded.locals_of(params)
            prepared = self.direction.prepare(
                shards,
                [torch.zeros_like(s) for s in shards],
                [{} for _ in params],
                self._perturbation.geometry,
            )
            for key, values in (prepared.new_state or {}).items():
                for p, value in zip(params, values, strict=True):
                    self.state[p].setdefault(key, sharded.like_param(torch.zeros_like(value), p))
        if self.perturb_every > 1:
            Perturbation.stored(self.state, params)
        return True

    # --- the step -----------------------------------------------------------------------------

    def _forward_step(
        self,
        micro: list[passes.MicroBatch],
        grad_scaler: torch.amp.GradScaler | None,
        no_sync: Callable[[], AbstractContextManager] | None,
    ) -> Tensor:
        """Both passes over the micro-batches, then the update."""
        if self.distributed == "local" and no_sync is None:
            raise ValueError(
                "distributed='local' perturbs with each rank's own gradient: pass "
                "step(..., no_sync=ddp_model.no_sync) so the clean pass skips the all-reduce"
            )
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        if scaler is not None and sharded.reduces():  # inside step's reducing(self.sharding)
            raise ValueError(
                "grad_scaler (fp16 loss scaling) is not supported with FSDP2-sharded parameters: "
                "train in bf16 with fully_shard(..., mp_policy=MixedPrecisionPolicy("
                "param_dtype=torch.bfloat16)) or torch.autocast(dtype=torch.bfloat16), which "
                "need no scaler"
            )
        reuse = not self._schedule.fresh_due()
        # One gradient pass only: ε reused (perturb_every) or made without a gradient (momentum).
        one_pass = reuse or not self.direction.needs_gradient
        self.zero_grad(set_to_none=True)
        rng_devices = self._cuda_devices() if self.replay_rng else None
        if not one_pass:
            clean = passes.clean_pass(
                micro,
                functional=self.functional,
                scaler=scaler,
                no_sync=no_sync,
                local=self.distributed == "local",
                rng_devices=rng_devices,
                check_graph=self.functional and not self._graph_checked,
            )
            self._graph_checked = True
            clean_overflow = (
                amp.unscale_clean_(self._grads(), scaler) if scaler is not None else None
            )
        elif self.functional:  # r(θ) from a no-grad clean forward
            clean = passes.clean_pass(
                micro,
                functional=True,
                scaler=scaler,
                rng_devices=rng_devices,
                parameter_grads=False,
            )
        else:  # one forward per micro-batch: no randomness to replay
            clean = passes.CleanPass([passes.Recorded(None, None)] * len(micro), None, None)
        if one_pass and scaler is not None:
            # No parameter has a clean gradient to unscale (and a fresh or just-loaded scaler has
            # no scale yet): the clean overflow flag is clear; a non-finite scaled r shows up in
            # the perturbed gradients instead.
            clean_overflow = torch.zeros(1, device=self._device())

        ok = clean.ok
        perturbed_loss = None
        try:  # an error in a perturbed pass must not leave θ perturbed
            for k in range(1 if one_pass else self.ascent_steps):
                if reuse:
                    self._perturbation.ascend_stored(self.param_groups, self.state)
                else:
                    self._perturbation.ascend(self.param_groups, self.state, first=k == 0)
                self.zero_grad(set_to_none=True)
                ok, perturbed_loss = passes.perturbed_pass(
                    micro, clean.records, scaler=scaler, no_sync=no_sync, ok=ok
                )
        except BaseException:
            self.abort_step()
            raise
        if scaler is not None:
            assert clean_overflow is not None
            amp.unscale_perturbed_(self, self._grads(), scaler, clean_overflow)
        self._descend(warn=scaler is None, ok=ok)
        if scaler is not None:
            scaler.update()
        self._schedule.advance(reused=reuse, taken=self._last_step_taken)
        loss = clean.loss if clean.loss is not None else perturbed_loss
        assert loss is not None
        return loss

    @torch.no_grad()
    def _descend(self, warn: bool, ok: Tensor | None = None) -> None:
        """Restore θ, then step the base optimizer, or skip the step if anything was non-finite
        (``ok``: the passes' losses were finite)."""
        perturbation = self._perturbation
        if perturbation.active is None:
            raise RuntimeError("second_step() called without first_step()")
        perturbation.restore()
        assert perturbation.clean_ok is not None
        ok = perturbation.clean_ok if ok is None else perturbation.clean_ok & ok
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if sharded.reduces():  # inside the public method's reducing(self.sharding)
            grad_norm = self._sharded_grad_norm(params, ok)
        elif self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            grad_norm = global_norm([p.grad for p in params])
        ok = ok & torch.isfinite(grad_norm)

        self._last_step_taken = None  # unknown until decided below
        if not self.skip_nonfinite:
            self.base_optimizer.step()
            perturbation.finish(self.state, taken=True)
            self._last_step_taken = True
            return
        if self.skips_on_device:
            not_ok = amp.step_or_skip_on_device(self.base_optimizer, ok)
            perturbation.finish(self.state, taken=False)  # stateless: nothing to keep
            skipped = self._skipped_device
            self._skipped_device = not_ok if skipped is None else skipped + not_ok
            return
        self._last_step_taken = bool(ok)  # the one host read of a step: was everything finite?
        perturbation.finish(self.state, taken=self._last_step_taken)
        if self._last_step_taken:
            self.base_optimizer.step()
            return
        self._skipped_host += 1
        if warn:  # not for an fp16 overflow: routine while GradScaler finds its scale
            warnings.warn(
                f"{type(self).__name__}: non-finite loss or gradient, step skipped "
                f"(parameters and optimizer state unchanged; {self.skipped_steps} skipped so far)",
                NonFiniteStepWarning,
                stacklevel=4,
            )

    @property
    def sharding(self) -> sharded.Sharding:
        """How θ is sharded (``active`` False: not at all), looked at again when the parameters
        change: Accelerate's FSDP2 swaps the DTensors into an optimizer built on the unsharded
        parameters. The public methods enter :func:`sharded.reducing` with it once per call."""
        params = _flat(self.param_groups)
        key = tuple(map(id, params))
        if self._sharding_of is None or self._sharding_of[0] != key:
            sharding = sharded.Sharding.of(params)
            if sharding.active and self.distributed == "local":
                raise ValueError(
                    "distributed='local' needs each rank's own full gradient, which FSDP2 never "
                    "holds (it reduce-scatters): use distributed='sync'"
                )
            self._sharding_of = (key, sharding)
        return self._sharding_of[1]

    def _sharded_grad_norm(self, params: list[Tensor], ok: Tensor) -> Tensor:
        """‖g‖ over every shard, clipping the shards if asked. A rank whose own loss was
        non-finite adds an infinite square, so every rank sees a non-finite norm and skips."""
        grads = [sharded.local(p.grad) for p in params]  # type: ignore[arg-type]
        device = grads[0].device if grads else self._device()
        partial = sum_of_squares(grads) if grads else torch.zeros((), device=device)
        partial = partial + torch.where(ok.to(device), 0.0, float("inf"))
        grad_norm = sharded.sum_over_shards(partial).sqrt()
        if self.max_grad_norm is not None and grads:  # as clip_grad_norm_ scales
            coef = (self.max_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return grad_norm

    # --- helpers ------------------------------------------------------------------------------

    def _require_classic_protocol(self, what: str) -> None:
        if self.functional:
            raise RuntimeError(
                f"{type(self).__name__} needs the clean pass's dlogits, which {what} cannot "
                "see: use step(forward=lambda: model(x), loss_fn=...)"
            )

    def _require_fresh_every_step(self, what: str) -> None:
        if self.perturb_every > 1:
            raise RuntimeError(
                f"perturb_every > 1 saves the clean backward, which {what} has already run: use "
                "step(forward=lambda: model(x), loss_fn=...)"
            )

    def _require_clean_gradient(self, what: str) -> None:
        if not self._grads():
            raise RuntimeError(
                f"{what} found no gradient on any parameter: this protocol perturbs along the "
                "gradient of a clean backward you have already run (loss = closure() or "
                f"loss.backward(), then opt.{what.split('(')[0]}(...)); to run both passes in one "
                "call use step(forward=lambda: model(x), loss_fn=...)"
            )

    def _grads(self) -> list[Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _cuda_devices(self) -> list[int]:
        return passes.cuda_devices([p for g in self.param_groups for p in g["params"]])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, direction={self.direction}, functional={self.functional}"
            + (f", perturb_every={self.perturb_every})" if self.perturb_every > 1 else ")")
        )


def _check_one_pass_options(ascent_steps: int, perturb_every: int, distributed: str) -> None:
    """A rule that needs no clean gradient (the momentum methods) runs one gradient pass a step
    already; the options that trade or spend clean backward passes mean nothing for it."""
    if perturb_every > 1:
        raise ValueError(
            "perturb_every > 1 saves the clean backward, and this method (ε along the momentum) "
            "runs none: it costs one gradient pass every step already. Leave perturb_every at 1"
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


def _flat(params: Iterable[Any]) -> list[Tensor]:
    """The tensors of a parameter list or of parameter groups."""
    out: list[Tensor] = []
    for item in params:
        out.extend(item["params"] if isinstance(item, dict) else [item])
    return out
