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

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from flatlm.optim import amp, combination, dcp, passes, sharded, state_layout
from flatlm.optim.directions import Direction, global_norm
from flatlm.optim.perturbation import Perturbation
from flatlm.optim.policies import (
    DECIDE,
    FRESH,
    KINDS,
    PLAIN,
    REUSE,
    StepPolicy,
    make_policy,
)
from flatlm.optim.preconditioners import BaseGeometry
from flatlm.optim.validation import (
    base_params,
    check_closure_origin,
    check_distributed_mode,
    check_gradient_rule,
    check_options,
    check_policy,
    check_rho,
    check_state_dict,
    check_step_arguments,
    flat_params,
    lightning_hint,
    require_classic_protocol,
    require_clean_gradient,
    require_policy_protocol,
)

__all__ = ["NonFiniteStepWarning", "SharpnessAwareOptimizer"]


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because a pass gave a non-finite loss or gradient."""


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
        gradient_rule: how a fresh step's update gradient is made from the clean g and the
            perturbed g_s (WSAM, GSAM: :mod:`flatlm.optim.combination`); None: g_s as it is.
        functional: take J(θ+ε)ᵀ r(θ) at the perturbed point instead of ∇L(θ+ε).
        ascent_steps: K normalised ascent steps of size ρ/K (each in the corruption set's own
            norm, so their sum stays in the set), the descent gradient taken at the last point.
        max_grad_norm: clip the gradient handed to the base optimizer (the perturbed one).
        perturb_every: make a fresh ε only every k-th step (flatlm's own rule, neither LookSAM
            nor composer's ``interval``; the policy ``reuse_direction``). The steps in between
            reuse the last ε's unit direction times the group's current ρ and skip the clean
            backward: one forward–backward at θ + ε (the returned loss is then L(θ+ε)).
        policy: which steps are fresh (two passes), reuse (one) or plain (the base step), a
            :class:`~flatlm.optim.policies.StepPolicy` or its name (docs/algorithms.md, "Step
            policies"); every step fresh by default. A step with ρ = 0 in every group is plain
            whatever the policy: one forward–backward and the base optimizer's own step.
        replay_rng: replay the clean pass's CPU/CUDA RNG state for the second pass, so dropout
            masks match and both passes evaluate one function.
        skip_nonfinite: skip the whole step (θ and all state unchanged) when a pass gives a
            non-finite loss or gradient. Deciding that costs one host read of a flag per step,
            unless the base optimizer can skip on device (``fused=True`` Adam/AdamW/SGD), which
            flatlm then uses, with no host sync at all.
        distributed: with DistributedDataParallel, ``"sync"`` (default) makes ε from the
            all-reduced clean gradient (N ranks equal one process on the global batch);
            ``"local"`` from each rank's own gradient (SAM's m-sharpness; needs
            ``step(..., no_sync=ddp_model.no_sync)``). With FSDP2 each rank perturbs its own
            shard and norms add their squares over the shard group (docs/fsdp.md).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        *,
        rho: float,
        direction: Direction,
        gradient_rule: combination.GradientRule | None = None,
        functional: bool = False,
        ascent_steps: int = 1,
        max_grad_norm: float | None = None,
        perturb_every: int = 1,
        policy: str | StepPolicy | None = None,
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
        params = base_params(params, base_optimizer, base_kwargs, type(self).__name__)
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
        self.policy = make_policy(policy, perturb_every)
        self.perturb_every = (
            getattr(self.policy, "every", 1) if self.policy.reuses == "direction" else 1
        )
        self.replay_rng = replay_rng
        self.skip_nonfinite = skip_nonfinite
        self.distributed = distributed
        self._sharding_of = sharded.ShardingOf()
        self.sharding  # noqa: B018 (checks the parameters now)
        geometry = BaseGeometry(self.base_optimizer)
        direction.validate(geometry)
        check_policy(self.policy, direction.needs_gradient, ascent_steps, distributed)
        check_gradient_rule(gradient_rule, self.policy, direction.needs_gradient, distributed)
        self.gradient_rule = gradient_rule
        self._perturbation = Perturbation(
            direction, geometry, ascent_steps=ascent_steps, keep_direction=self.perturb_every > 1
        )
        self._skipped = amp.SkipCount()
        self._counts = dict.fromkeys(KINDS, 0)
        self._kind: str | None = None  # the kind of a step first_step began
        self._kept_clean: combination.Kept | None = None  # a fresh step's g, if the policy asks
        self._last_step_taken: bool | None = None
        self._graph_checked = False  # the functional methods' loss graph, checked once

    # --- public protocol --------------------------------------------------------------------

    @sharded.over_shards
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

        ``step(forward=..., loss_fn=...)``: ``forward()`` returns the logits, ``loss_fn`` maps
        them to the scalar loss; both passes run here. Returns the clean loss (a tensor).
        ``micro_batches=[mb, ...]`` (accumulation): ``forward(mb)`` and ``loss_fn(logits, mb)``
        for each, each loss weighted 1/M, ε from the accumulated clean gradient, the second pass
        over the same micro-batches (each with its own dlogits and RNG state): with equal-sized
        micro-batches and mean losses, one step on the concatenated batch. Returns the mean
        clean loss. ``grad_scaler`` (fp16): both passes scaled and unscaled (ε from unscaled
        gradients), an overflow in either skips the whole step (counted in ``skipped_steps``, no
        warning), ``grad_scaler.update()`` called here (never call ``scaler.step``/``update``
        yourself). ``no_sync``: a DDP model's ``no_sync``: micro-batches all-reduce once per
        pass, and ``distributed="local"`` keeps the clean pass local.

        ``step(closure)``: the davda54/sam protocol: the caller has run the clean forward and
        backward; ``closure`` (forward + backward) runs at the perturbed point. Returns its loss;
        a plain step (ρ = 0, or the policy's) steps on the clean gradient and returns None.

        A momentum method (``msam``; ``mfsam``/``mpfsam`` need ``forward=``) runs no clean
        backward: ``step(forward=...)`` returns L(θ+ε) for ``msam``, the clean loss of a no-grad
        forward for the functional ones; ``step(closure)`` calls the closure once, at θ + ε.
        """
        check_step_arguments(closure, forward, loss_fn, micro_batches, grad_scaler, no_sync)
        if forward is not None:
            micro = passes.micro_batches_of(forward, loss_fn, micro_batches)  # type: ignore[arg-type]
            return self._forward_step(micro, grad_scaler, no_sync)
        if closure is None:
            if dcp.is_state_init_call(self.param_groups):  # torch.distributed.checkpoint's
                self._init_checkpoint_state()
                return None
            raise TypeError(
                f"{type(self).__name__}.step needs forward= and loss_fn= (or a closure that "
                "recomputes the loss and its gradient)" + lightning_hint()
            )
        check_closure_origin(closure)
        require_classic_protocol(self.functional, type(self).__name__, "step(closure)")
        require_policy_protocol(self.policy, "step(closure)")
        if self._begin_classic("step(closure)") != FRESH:
            self.second_step()  # the caller's clean gradient: one pass, no closure call
            return None
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            for k in range(self.ascent_steps):
                if k > 0:
                    self._perturbation.ascend(self.param_groups, self.state, first=False)
                self.zero_grad(set_to_none=True)
                loss = closure()
        except BaseException:
            self.abort_step()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    @sharded.over_shards
    def first_step(self, zero_grad: bool = False, *, functional_vjp: bool = False) -> bool:
        """Move θ to θ + ε using the gradient the caller's backward left in ``p.grad``.

        Returns whether it did: False when the policy makes this step plain (or a LookSAM
        reuse), or ρ is 0 in every group: θ stays, and ``second_step()`` steps the base optimizer
        with the gradient then in ``p.grad`` (the clean one if the second pass is skipped; a
        second pass at θ gives it again).

        The functional methods refuse this protocol unless ``functional_vjp=True``: the caller
        then promises to run the second pass as ``logits.backward(r)`` with the clean pass's
        dlogits r (:func:`flatlm.optim.passes.vjp`; integrations that own the loop do).

        ``msam`` perturbs along the momentum and reads no gradient: call ``first_step()`` before
        the step's only backward (``first_step(); loss(model(x)).backward(); second_step()``).
        """
        if not functional_vjp:
            require_classic_protocol(self.functional, type(self).__name__, "first_step()")
        require_policy_protocol(self.policy, "first_step()")
        if self.ascent_steps > 1:
            raise RuntimeError("ascent_steps > 1 needs step(closure) or step(forward=, loss_fn=)")
        fresh = self._begin_classic("first_step()") == FRESH
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return fresh

    def _begin_classic(self, what: str) -> str:
        """The kind of a classic-protocol step from the caller's clean gradient; θ → θ + ε if
        fresh."""
        kind = self._plan()
        if kind != PLAIN and self.direction.needs_gradient:
            require_clean_gradient(self._grads(), what)
        if kind == DECIDE:
            kind = self.policy.decide(self._clean_sq_norm())
        self._kind = kind
        if kind == FRESH:
            self._keep_clean()
            self._perturbation.ascend(self.param_groups, self.state, first=True)
        return kind

    @torch.no_grad()
    @sharded.over_shards
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore θ exactly and step the base optimizer with the gradient now in ``p.grad``."""
        kind, self._kind = self._kind or FRESH, None
        if kind == FRESH:
            self._descend(warn=True)
        else:
            if kind == REUSE:
                self._correct()
            self._update(None, warn=True)
        self._end_step(kind)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a started step: θ copied back (bit for bit), nothing stepped; a no-op when no
        step is under way. ``step`` calls it when a pass raises; two-phase loops should too."""
        self._perturbation.abort()
        self._kind = self._kept_clean = None

    @torch.no_grad()
    @sharded.over_shards
    def perturbation(self) -> list[Tensor | None]:
        """The method's ε per parameter of ``param_groups`` from the gradients now in ``p.grad``.

        Changes nothing (θ, gradients, state); None where a parameter has no gradient.
        """
        by_param = self._perturbation.epsilon(self.param_groups, self.state)
        return [by_param.get(p) for group in self.param_groups for p in group["params"]]

    @property
    def step_counts(self) -> dict[str, int]:
        """Steps taken so far by kind, ``{"fresh": ..., "reuse": ..., "plain": ...}`` (host
        ints, no sync; skipped steps included: their passes were paid). Saved in checkpoints."""
        return dict(self._counts)

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient."""
        return self._skipped.total()

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
            and not self.policy.keeps_clean_gradient
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
        each entry the base optimizer's with this method's own merged in under ``flatlm_`` keys
        (GA-SAM's ``flatlm_grad_sq_ema``, the policy's stored tensor); ``param_groups`` with
        flatlm's optimizer-wide values (method, skipped steps, step counts, the policy's state)
        in every group."""
        return state_layout.to_standard(
            self.base_optimizer.state_dict(),
            super().state_dict()["state"],
            state_layout.Scalars(
                type(self).__name__,
                self.skipped_steps,
                self.policy.since_fresh,
                tuple(self._counts[k] for k in KINDS),
                self.policy.dumps(),
            ),
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()``: torch's layout, keyed by index or (from
        ``torch.distributed.checkpoint``) by parameter name, or flatlm 0.2's layout. A policy's
        state saved by another policy is not used (that policy's stored tensors are dropped)."""
        check_state_dict(state_dict, type(self).__name__, self.param_groups)
        parts = state_layout.split(state_dict)  # flatlm's group entries are left out of both
        self.base_optimizer.load_state_dict(parts.base)
        # Load our own state against the base's (now loaded) groups, then share them again.
        super().load_state_dict(
            {"state": parts.method_state, "param_groups": parts.base["param_groups"]}
        )
        self.param_groups = self.base_optimizer.param_groups
        scalars = parts.scalars
        self._skipped = amp.SkipCount(scalars.skipped_steps)
        self._counts = dict(zip(KINDS, scalars.step_counts, strict=True))
        saved = state_layout.policy_name(scalars.policy)
        if saved == self.policy.name:
            self.policy.loads(scalars.policy)  # type: ignore[arg-type]
        elif saved is None and self.policy.reuses == "direction":  # before policies were saved
            since = scalars.steps_since_fresh_perturbation
            self.policy.since_fresh = None if since is None else int(since)
        Perturbation.drop_other_stored(self.state, self.policy.stored)

    def _init_checkpoint_state(self) -> None:
        """Every entry a checkpoint of this optimizer holds (:mod:`~flatlm.optim.dcp`)."""

        def init_stored(params: list[Tensor]) -> None:
            if self.policy.stored is not None:
                Perturbation.stored(self.state, params, self.policy.stored)

        dcp.init_state(
            self.param_groups,
            self.base_optimizer,
            self.state,
            self.direction,
            self._perturbation.geometry,
            init_stored,
        )

    # --- the step -----------------------------------------------------------------------------

    def _forward_step(
        self,
        micro: list[passes.MicroBatch],
        grad_scaler: torch.amp.GradScaler | None,
        no_sync: Callable[[], AbstractContextManager] | None,
    ) -> Tensor:
        """The passes the step's kind needs over the micro-batches, then the update."""
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        check_distributed_mode(  # inside step's reducing(self.sharding)
            self.distributed, sharded=sharded.reduces(), scaler=scaler is not None, no_sync=no_sync
        )
        kind = self._plan()
        # One gradient pass, at θ + ε: ε reused (perturb_every) or made without a gradient.
        one_pass = kind == REUSE and self.policy.reuses == "direction"
        one_pass |= kind == FRESH and not self.direction.needs_gradient
        # A step that may run a second pass records what the replay needs.
        may_perturb = one_pass or kind in (FRESH, DECIDE)
        self.zero_grad(set_to_none=True)
        clean = passes.clean_pass(
            micro,
            functional=self.functional and may_perturb,
            scaler=scaler,
            no_sync=no_sync,
            local=self.distributed == "local" and may_perturb,
            rng_devices=self._cuda_devices() if self.replay_rng and may_perturb else None,
            parameter_grads=not one_pass,
            check_graph=self.functional and not self._graph_checked and not one_pass,
        )
        self._graph_checked |= self.functional and not one_pass
        clean_overflow = None
        if scaler is not None:
            # One pass: no parameter has a clean gradient to unscale (a fresh or just-loaded
            # scaler has no scale yet), the flag is clear; a non-finite scaled r shows up in the
            # perturbed gradients instead.
            clean_overflow = (
                torch.zeros(1, device=self._device())
                if one_pass
                else amp.unscale_clean_(self._grads(), scaler)
            )
        if kind == DECIDE:
            kind = self.policy.decide(self._clean_sq_norm())
        if kind != FRESH and not one_pass:  # plain, or LookSAM's correction: no second pass
            if kind == REUSE:
                self._correct()
            if scaler is not None:
                assert clean_overflow is not None
                amp.record_unscaled(scaler, self, clean_overflow)
            self._update(clean.ok, warn=scaler is None)
            if scaler is not None:
                scaler.update()
            self._end_step(kind)
            assert clean.loss is not None
            return clean.loss
        if kind == FRESH:
            self._keep_clean()

        ok = clean.ok
        perturbed_loss = None
        try:  # an error in a perturbed pass must not leave θ perturbed
            for k in range(1 if one_pass else self.ascent_steps):
                if kind == REUSE:
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
        self._end_step(kind)
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
        kept, self._kept_clean = self._kept_clean, None
        orthogonal = None
        if kept is not None and self.policy.keeps_clean_gradient:  # LookSAM
            orthogonal = combination.orthogonal_of(kept)
        if kept is not None and self.gradient_rule is not None:  # WSAM, GSAM
            combination.combine_(kept, self.gradient_rule)
        self._update(ok, warn)
        if orthogonal is not None and self._last_step_taken:  # kept only if the step is taken
            combination.store(self.state, orthogonal, self.policy.stored)  # type: ignore[arg-type]

    @torch.no_grad()
    def _update(self, ok: Tensor | None, warn: bool) -> None:
        """Clip, then step the base optimizer on the gradient in ``p.grad``, or skip the step if
        it or ``ok`` (the passes' finiteness, None: nothing to add) is non-finite."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = self._device()
        ok = torch.ones((), dtype=torch.bool, device=device) if ok is None else ok
        grad_norm = sharded.clip_grad_norm_(params, self.max_grad_norm, ok, device)
        taken = amp.step_or_skip(
            self.base_optimizer,
            ok & torch.isfinite(grad_norm),
            self._skipped,
            skip_nonfinite=self.skip_nonfinite,
            on_device=self.skips_on_device,
        )
        self._last_step_taken = taken
        # On the device (taken None) the rule is stateless: nothing to keep.
        self._perturbation.finish(self.state, taken=bool(taken))
        if taken is False and warn:  # not for an fp16 overflow: routine while GradScaler scales
            warnings.warn(
                f"{type(self).__name__}: non-finite loss or gradient, step skipped "
                f"(parameters and optimizer state unchanged; {self.skipped_steps} skipped so far)",
                NonFiniteStepWarning,
                stacklevel=5,
            )

    # --- the policy's parts of a step --------------------------------------------------------

    def _plan(self) -> str:
        """This step's kind: plain when ρ is 0 in every group, else the policy's."""
        if all(float(g["rho"]) == 0.0 for g in self.param_groups):
            return PLAIN
        return self.policy.plan()

    def _end_step(self, kind: str) -> None:
        self._counts[kind] += 1
        self.policy.advance(kind, self._last_step_taken)

    def _keep_clean(self) -> None:
        if self.policy.keeps_clean_gradient or self.gradient_rule is not None:
            self._kept_clean = combination.keep_clean(self.param_groups)

    def _correct(self) -> None:
        """LookSAM between fresh steps: the stored g_v added to the clean gradient."""
        alpha = self.policy.alpha  # type: ignore[attr-defined]
        combination.correct_(self.param_groups, self.state, self.policy.stored, alpha)  # type: ignore[arg-type]

    def _clean_sq_norm(self) -> float:
        """‖g‖² of the clean gradient: AE-SAM's statistic, one host read per step."""
        return float(global_norm(sharded.locals_of(self._grads())) ** 2)

    @property
    def sharding(self) -> sharded.Sharding:
        """How θ is sharded (``active`` False: not at all); the public methods enter
        :func:`sharded.reducing` with it once per call."""
        sharding = self._sharding_of(flat_params(self.param_groups))
        check_distributed_mode(self.distributed, sharded=sharding.active)
        return sharding

    # --- helpers ------------------------------------------------------------------------------

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
            + (f", gradient_rule={self.gradient_rule}" if self.gradient_rule is not None else "")
            + (f", policy={self.policy!r})" if not self.policy.every_step else ")")
        )
