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

With ``noisy_pass`` (bSAM) the clean pass runs at θ + e, e drawn by the base optimizer
(``draw_noise``), and θ is copied back before ε is made.

A method is therefore a direction rule plus one flag (``functional``), not a class of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from flatlm.optim import amp, combination, dcp, passes, sharded, state_layout
from flatlm.optim.amp import NonFiniteStepWarning
from flatlm.optim.directions import Direction, global_norm
from flatlm.optim.perturbation import Perturbation
from flatlm.optim.policies import DECIDE, FRESH, PLAIN, REUSE, StepBook, StepPolicy, make_policy
from flatlm.optim.preconditioners import BaseGeometry
from flatlm.optim.validation import (
    base_params,
    check_base_hooks,
    check_closure_origin,
    check_distributed_mode,
    check_method,
    check_options,
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


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; ``direction`` and ``functional`` define the method.

    ``param_groups`` is the base optimizer's own list (LR schedulers work on either object) with
    this optimizer's keys (``rho`` …) added; changing ``group["rho"]`` takes effect next step.
    Every argument (``rho``, ``gradient_rule``, ``ascent_steps``, ``perturb_every``, ``policy``,
    ``replay_rng``, ``skip_nonfinite``, ``distributed`` …) is documented in docs/algorithms.md,
    "The engine's arguments and protocols".
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
        noisy_pass: bool = False,
        **base_kwargs: Any,
    ):
        options = (rho, functional, ascent_steps, max_grad_norm, perturb_every, distributed)
        check_options(base_optimizer, *options, wrapper=SharpnessAwareOptimizer)
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
        check_method(direction, geometry, self.policy, gradient_rule, ascent_steps, distributed)
        check_base_hooks(self.base_optimizer, noisy_pass, gradient_rule)
        self.noisy_pass = noisy_pass
        self._noised = False  # add_noise() moved θ to θ + e for the caller's clean pass
        self.gradient_rule = gradient_rule
        self._clean = combination.CleanGradient(self.policy, gradient_rule)
        self._perturbation = Perturbation(
            direction, geometry, ascent_steps=ascent_steps, keep_direction=self.perturb_every > 1
        )
        self._skipped = amp.SkipCount()
        self._steps = StepBook(self.policy)
        self._kind: str | None = None  # the kind of a step first_step began
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
        """One full step: ``step(forward=, loss_fn=)`` (optionally ``micro_batches``,
        ``grad_scaler``, ``no_sync``) runs both passes and returns the clean loss;
        ``step(closure)`` (davda54/sam's protocol) runs the closure at θ + ε after the caller's
        clean backward and returns its loss (None for a plain step). docs/algorithms.md, "The
        engine's arguments and protocols", says what each returns for each kind of method.
        """
        check_step_arguments(closure, forward, loss_fn, micro_batches, grad_scaler, no_sync)
        if forward is not None:
            micro = passes.micro_batches_of(forward, loss_fn, micro_batches)  # type: ignore[arg-type]
            return self._forward_step(micro, grad_scaler, no_sync)
        if closure is None:
            if dcp.is_state_init_call(self.param_groups):  # torch.distributed.checkpoint's
                groups, base, state = self.param_groups, self.base_optimizer, self.state
                dcp.init_state(groups, base, state, self._perturbation, self.policy.stored)
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
        """Move θ to θ + ε using the gradient the caller's backward left in ``p.grad``; returns
        whether it did (False: a plain or reuse step, θ stays). The functional methods need
        ``functional_vjp=True`` (the second pass then ``logits.backward(r)``); ``msam`` is called
        before the step's only backward (docs/algorithms.md, "The engine's arguments and
        protocols")."""
        if not functional_vjp:
            require_classic_protocol(self.functional, type(self).__name__, "first_step()")
        require_policy_protocol(self.policy, "first_step()")
        if self.ascent_steps > 1:
            raise RuntimeError("ascent_steps > 1 needs step(closure) or step(forward=, loss_fn=)")
        fresh = self._begin_classic("first_step()") == FRESH
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return fresh

    @torch.no_grad()
    @sharded.over_shards
    def add_noise(self) -> bool:
        """bSAM in the classic protocols: θ → θ + e before the caller's clean forward and
        backward (``first_step``/``step(closure)`` then copy θ back bit for bit); returns whether
        it did (False: the next step is plain, whose clean pass is at θ). Calling it again
        before that step changes nothing (one noise for all of a step's micro-batches)."""
        if not self.noisy_pass:
            raise RuntimeError(f"{type(self).__name__} draws no weight noise (noisy_pass=False)")
        if self._noised:
            return True
        if self._steps.plan(self.param_groups) == PLAIN:
            return False
        self._perturbation.shift(self.param_groups, self.base_optimizer.draw_noise)  # type: ignore[attr-defined]
        self._noised = True
        return True

    def _begin_classic(self, what: str) -> str:
        """The kind of a classic-protocol step from the caller's clean gradient; θ → θ + ε if
        fresh."""
        kind = self._steps.plan(self.param_groups)
        if self.noisy_pass and self._noised:  # the caller's clean pass ran at θ + e: θ back
            self._perturbation.restore()
            self._noised = False
        elif self.noisy_pass and kind != PLAIN:
            raise RuntimeError(
                f"{type(self).__name__} takes its clean gradient at the noisy point θ + e: call "
                f"opt.add_noise() before the clean forward and backward, then {what} (or use "
                "step(forward=, loss_fn=), which does both)"
            )
        if kind != PLAIN and self.direction.needs_gradient:
            require_clean_gradient(self._grads(), what)
        self._kind = kind = self._decided(kind)
        if kind == FRESH:
            self._clean.keep(self.param_groups)
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
                self._clean.correct(self.param_groups, self.state)
            self._update(None, warn=True)
        self._steps.end(kind, self._last_step_taken)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a started step: θ copied back (bit for bit), nothing stepped; a no-op when no
        step is under way. ``step`` calls it when a pass raises; two-phase loops should too."""
        self._perturbation.abort()
        self._kind = self._clean.kept = self._clean.for_base = None
        self._noised = False

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
        return dict(self._steps.counts)

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient."""
        return self._skipped.total()

    def extra_bytes(self) -> int:
        """Bytes held between steps beyond the base optimizer's state: the clean copy of θ and
        the method's own state (GA-SAM's EMA, perturb_every's stored direction); this rank's
        shards under FSDP2."""
        return self._perturbation.extra_bytes(self.state)

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
        like any optimizer's, with this method's state under ``flatlm_`` keys
        (:mod:`~flatlm.optim.state_layout` says where each value goes)."""
        return state_layout.to_standard(
            self.base_optimizer.state_dict(),
            super().state_dict()["state"],
            self._steps.scalars(type(self).__name__, self.skipped_steps),
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
        self._skipped = amp.SkipCount(parts.scalars.skipped_steps)
        self._steps.load(parts.scalars)
        Perturbation.drop_other_stored(self.state, self.policy.stored)

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
        if self._noised:
            self.abort_step()  # θ back before raising
            raise RuntimeError(
                "add_noise() is for the classic protocols: step(forward=, loss_fn=) draws the "
                "noise itself (θ was copied back)"
            )
        kind = self._steps.plan(self.param_groups)
        # One gradient pass, at θ + ε: ε reused (perturb_every) or made without a gradient.
        one_pass = kind == REUSE and self.policy.reuses == "direction"
        one_pass |= kind == FRESH and not self.direction.needs_gradient
        # A step that may run a second pass records what the replay needs.
        may_perturb = one_pass or kind in (FRESH, DECIDE)
        self.zero_grad(set_to_none=True)
        noisy = self.noisy_pass and may_perturb and not one_pass
        if noisy:  # bSAM: θ → θ + e for the clean pass, copied back after it
            self._perturbation.shift(self.param_groups, self.base_optimizer.draw_noise)  # type: ignore[attr-defined]
        try:
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
        except BaseException:
            self.abort_step()
            raise
        if noisy:
            self._perturbation.restore()
        self._graph_checked |= self.functional and not one_pass
        clean_overflow = amp.unscale_clean_pass_(scaler, self._grads(), one_pass, self._device())
        kind = self._decided(kind)
        if kind != FRESH and not one_pass:  # plain, or LookSAM's correction: no second pass
            if kind == REUSE:
                self._clean.correct(self.param_groups, self.state)
            if scaler is not None:
                assert clean_overflow is not None
                amp.record_unscaled(scaler, self, clean_overflow)
            self._update(clean.ok, warn=scaler is None)
            if scaler is not None:
                scaler.update()
            self._steps.end(kind, self._last_step_taken)
            assert clean.loss is not None
            return clean.loss
        if kind == FRESH:
            self._clean.keep(self.param_groups)

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
        self._steps.end(kind, self._last_step_taken)
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
        orthogonal = self._clean.combine()  # WSAM, GSAM: g_s combined; LookSAM: g_v to keep
        handed, self._clean.for_base = self._clean.for_base, None
        if handed is None:
            self._update(ok, warn)
        else:  # bSAM: the base optimizer's scale update reads the clean (noisy-point) g
            base: Any = self.base_optimizer
            base.noisy_grads = dict(zip(handed.params, handed.values, strict=True))
            try:
                self._update(ok, warn)
            finally:
                base.noisy_grads = {}
        if orthogonal is not None and self._last_step_taken:  # kept only if the step is taken
            self._clean.store(self.state, orthogonal)

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
            amp.warn_skipped(type(self).__name__, self.skipped_steps)

    def _decided(self, kind: str) -> str:
        """AE-SAM's kind from ‖g‖² of the clean gradient (one host read per step)."""
        if kind != DECIDE:
            return kind
        return self.policy.decide(float(global_norm(sharded.locals_of(self._grads())) ** 2))

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
