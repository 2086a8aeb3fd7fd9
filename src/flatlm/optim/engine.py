"""The perturbation engine shared by every sharpness-aware method in flatlm.

One step (see ALGORITHMS.md):

1. clean pass at θ: loss L, gradient g (and, for the functional methods, r = ∂ℓ/∂logits);
2. ε from g by the method's *direction rule*, scaled to radius ρ per parameter group;
3. second pass at θ + ε: the full loss gradient ∇L(θ+ε), or for the functional methods the
   vector–Jacobian product J(θ+ε)ᵀ r(θ) (``logits.backward(r)``);
4. θ restored bit for bit from a copy (never by subtracting ε), the base optimizer steps.

A method is therefore a direction rule plus one flag (``functional``), not a class of its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.directions import Direction, global_norm

__all__ = ["NonFiniteStepWarning", "SharpnessAwareOptimizer"]


def _inverse_norm(norm: Tensor) -> Tensor:
    """1/‖n‖ in at least float32, with ‖n‖ = 0 giving a finite value (then u = 0, so ε = 0).

    A floor instead of the usual ``+ 1e-12``: adding shrinks ε by 1e-12/‖n‖ relative, which is
    not negligible when gradients are small.
    """
    norm = norm.to(torch.promote_types(norm.dtype, torch.float32))
    return 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _has_grad(p: Tensor) -> bool:
    return p.grad is not None


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because a pass gave a non-finite loss or gradient."""


@dataclass
class _Gathered:
    """The parameters with a gradient, flat, and each group's [start, end) and ρ."""

    params: list[Tensor]
    slices: list[tuple[int, int, float]]


class RngState:
    """The CPU and CUDA generator states, so the second pass sees the first pass's randomness."""

    def __init__(self, cuda_devices: list[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


class SharpnessAwareOptimizer(torch.optim.Optimizer):
    """Wraps a base optimizer; ``direction`` and ``functional`` define the method.

    ``param_groups`` is the base optimizer's own list (LR schedulers work on either object) with
    this optimizer's keys (``rho`` …) added; changing ``group["rho"]`` takes effect next step.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer: the wrapped optimizer's class (AdamW by default), built on the same groups
            with ``base_kwargs``.
        rho: perturbation radius ρ ≥ 0.
        direction: the rule that makes ε's direction (see :mod:`flatlm.optim.directions`).
        functional: take J(θ+ε)ᵀ r(θ) at the perturbed point instead of ∇L(θ+ε).
        ascent_steps: K normalised ascent steps of size ρ/K, each projected back onto the
            corruption set, the descent gradient taken at the last point.
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
            their own: in sync mode every rank holds the same gradient.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
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
        _check_rho(rho)
        if distributed not in ("sync", "local"):
            raise ValueError(f"distributed must be 'sync' or 'local', got {distributed!r}")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.AdamW, with its "
                f"arguments as keywords; got an instance of {type(base_optimizer).__name__}"
            )
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                "base_optimizer must be a subclass of torch.optim.Optimizer (e.g. "
                f"torch.optim.AdamW), got {base_optimizer!r}"
            )
        if isinstance(base_optimizer, type) and issubclass(base_optimizer, SharpnessAwareOptimizer):
            raise TypeError("base_optimizer cannot itself be a sharpness-aware optimizer")
        if not isinstance(ascent_steps, int) or ascent_steps < 1:
            raise ValueError(f"ascent_steps must be an integer >= 1, got {ascent_steps!r}")
        if functional and ascent_steps > 1:
            raise ValueError("the functional methods take a single ascent step")
        if (
            isinstance(perturb_every, bool)
            or not isinstance(perturb_every, int)
            or perturb_every < 1
        ):
            raise ValueError(f"perturb_every must be an integer >= 1, got {perturb_every!r}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")

        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        super().__init__(params, {"rho": rho})
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
        direction.validate(self)

        # Not in self.state: the clean copies are scratch, never saved in a checkpoint.
        self._clean_copies: dict[Tensor, Tensor] = {}
        self._scratch: dict[str, Any] = {}
        self._perturbed: _Gathered | None = None
        self._clean_ok: Tensor | None = None
        self._skipped_host = 0
        self._skipped_device: Tensor | None = None
        # perturb_every > 1: steps since the last fresh ε was taken (None: a fresh one is due).
        self._since_fresh: int | None = None
        self._last_step_taken: bool | None = None

    # --- public protocol --------------------------------------------------------------------

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
        """
        if forward is not None:
            if closure is not None:
                raise TypeError("pass either closure or forward/loss_fn, not both")
            if loss_fn is None:
                raise TypeError("step(forward=...) also needs loss_fn=...")
            if micro_batches is None:
                passes = [(forward, loss_fn)]
            else:
                passes = [
                    (partial(forward, mb), partial(_loss_of_micro_batch, loss_fn, mb))
                    for mb in micro_batches
                ]
                if not passes:
                    raise ValueError("micro_batches is empty")
            return self._forward_step(passes, grad_scaler, no_sync)
        if micro_batches is not None or grad_scaler is not None or no_sync is not None:
            raise TypeError("micro_batches, grad_scaler and no_sync need forward= and loss_fn=")
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step needs forward= and loss_fn= (or a closure that "
                "recomputes the loss and its gradient)"
            )
        self._require_classic_protocol("step(closure)")
        self._require_fresh_every_step("step(closure)")
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            for k in range(self.ascent_steps):
                self._ascend(first=k == 0)
                self.zero_grad(set_to_none=True)
                loss = closure()
        except BaseException:
            self.abort_step()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, functional_vjp: bool = False) -> None:
        """Move θ to θ + ε using the gradient the caller's backward left in ``p.grad``.

        The functional methods refuse this protocol unless ``functional_vjp=True``: the caller
        then promises to run the second pass as ``logits.backward(r)`` with the clean pass's
        dlogits r (integrations that own the training loop do; see flatlm.integrations).
        """
        if not functional_vjp:
            self._require_classic_protocol("first_step()")
        self._require_fresh_every_step("first_step()")
        if self.ascent_steps > 1:
            raise RuntimeError("ascent_steps > 1 needs step(closure) or step(forward=, loss_fn=)")
        self._ascend(first=True)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, _warn: bool = True) -> None:
        """Restore θ exactly and step the base optimizer with the gradient now in ``p.grad``."""
        if self._perturbed is None:
            raise RuntimeError("second_step() called without first_step()")
        self._restore()
        self._base_step(self._clean_ok, warn=_warn)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def abort_step(self) -> None:
        """Undo a started step: θ copied back (bit for bit), nothing stepped; a no-op when no
        step is under way. ``step`` calls it when a pass raises; two-phase loops should too."""
        if self._perturbed is not None:
            self._restore()
        self._scratch = {}

    @torch.no_grad()
    def perturbation(self) -> list[Tensor | None]:
        """The method's ε per parameter of ``param_groups`` from the gradients now in ``p.grad``.

        Changes nothing (θ, gradients, state); None where a parameter has no gradient.
        """
        gathered = self._gather_params()
        grads = torch._foreach_mul([p.grad for p in gathered.params], 1.0)  # a copy
        u, n = self.direction(self, gathered.params, grads, {})
        eps = self._scale_by_group(gathered, u, _inverse_norm(global_norm(n)))
        by_param = dict(zip(gathered.params, eps, strict=True))
        return [by_param.get(p) for group in self.param_groups for p in group["params"]]

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient."""
        device = 0 if self._skipped_device is None else int(self._skipped_device.item())
        return self._skipped_host + device

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        _check_rho(param_group.setdefault("rho", self.defaults["rho"]))
        self.base_optimizer.add_param_group(param_group)

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's whole state (moments, steps, groups) plus this method's own."""
        own = super().state_dict()
        return {
            "flatlm_method": type(self).__name__,
            "base": self.base_optimizer.state_dict(),
            "method_state": own["state"],
            "skipped_steps": self.skipped_steps,
            "steps_since_fresh_perturbation": self._since_fresh,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or not {"base", "method_state"} <= set(state_dict):
            raise ValueError(
                f"not a {type(self).__name__} state dict: expected keys 'base' and 'method_state'"
                + (
                    f", got {sorted(state_dict)[:8]}"
                    if isinstance(state_dict, dict)
                    else f", got {type(state_dict).__name__}"
                )
            )
        method = state_dict.get("flatlm_method")
        if method is not None and method != type(self).__name__:
            raise ValueError(
                f"state dict is for {method}, cannot load it into {type(self).__name__}"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        # Load our own state against the base's (now loaded) groups, then share them again.
        super().load_state_dict(
            {
                "state": state_dict["method_state"],
                "param_groups": state_dict["base"]["param_groups"],
            }
        )
        self.param_groups = self.base_optimizer.param_groups
        self._skipped_host = int(state_dict.get("skipped_steps", 0))
        self._skipped_device = None
        since = state_dict.get("steps_since_fresh_perturbation")
        self._since_fresh = None if since is None else int(since)
        if self.perturb_every == 1:  # a direction saved with perturb_every > 1 is not used here
            self._drop_stored_directions()
            self._since_fresh = None

    # --- the step -----------------------------------------------------------------------------

    def _forward_step(
        self,
        passes: list[tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]],
        grad_scaler: torch.amp.GradScaler | None = None,
        no_sync: Callable[[], AbstractContextManager] | None = None,
    ) -> Tensor:
        """Both passes over ``passes`` (one (forward, loss_fn) per micro-batch), then the update."""
        if self.distributed == "local" and no_sync is None:
            raise ValueError(
                "distributed='local' perturbs with each rank's own gradient: pass "
                "step(..., no_sync=ddp_model.no_sync) so the clean pass skips the all-reduce"
            )
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        if not self._fresh_perturbation_due():
            return self._reuse_step(passes, scaler, no_sync)
        self.zero_grad(set_to_none=True)
        weight = 1.0 / len(passes)
        rngs: list[RngState | None] = []
        dlogits: list[Tensor | None] = []
        clean_loss = None
        ok = None
        for i, (forward, loss_fn) in enumerate(passes):
            rngs.append(RngState(self._cuda_devices()) if self.replay_rng else None)
            # DDP: all-reduce once, on the last micro-batch; never in 'local' mode (m-sharpness).
            skip_sync = no_sync is not None and (i < len(passes) - 1 or self.distributed == "local")
            with torch.enable_grad(), no_sync() if skip_sync else nullcontext():
                logits = forward()
                loss = loss_fn(logits)
                if self.functional:
                    logits.retain_grad()
                _backward(loss, weight, scaler)
            # r of the weighted (and scaled) loss: the second pass's VJP carries the same factors.
            dlogits.append(logits.grad.detach() if self.functional else None)
            del logits
            loss = loss.detach()
            clean_loss = _add_weighted(clean_loss, loss, weight)
            ok = _all_finite(ok, loss)
        clean_overflow = self._unscale_clean(scaler) if scaler is not None else None

        try:  # an error in a perturbed pass must not leave θ perturbed
            for k in range(self.ascent_steps):
                self._ascend(first=k == 0)
                self.zero_grad(set_to_none=True)
                ok, _ = self._perturbed_passes(passes, rngs, dlogits, weight, scaler, no_sync, ok)
        except BaseException:
            self.abort_step()
            raise
        self._finish_step(scaler, clean_overflow, ok)
        if self.perturb_every > 1:  # a skipped step leaves no direction worth reusing
            # None: skipped on the host path; on the device path it is not known (no sync)
            self._since_fresh = None if self._last_step_taken is False else 1
        assert clean_loss is not None
        return clean_loss

    def _perturbed_passes(
        self,
        passes: list[tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]],
        rngs: list[RngState | None],
        dlogits: list[Tensor | None],
        weight: float,
        scaler: torch.amp.GradScaler | None,
        no_sync: Callable[[], AbstractContextManager] | None,
        ok: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Forward–backward of every micro-batch at the perturbed point: ∇L, or with dlogits r
        the VJP J(θ+ε)ᵀ r. Returns ``ok`` and'ed with the finiteness of the perturbed losses,
        and their weighted sum (None for the VJP, which computes no loss)."""
        total = None
        for i, ((forward, loss_fn), rng, r) in enumerate(zip(passes, rngs, dlogits, strict=True)):
            if rng is not None:
                rng.restore()
            skip_sync = no_sync is not None and i < len(passes) - 1
            with torch.enable_grad(), no_sync() if skip_sync else nullcontext():
                logits = forward()
                if r is not None:
                    if logits.shape != r.shape:
                        raise RuntimeError(
                            f"forward() returned logits of shape {tuple(logits.shape)} at the "
                            f"perturbed point but {tuple(r.shape)} at the clean point"
                        )
                    logits.backward(r.to(logits.dtype))
                else:
                    perturbed_loss = loss_fn(logits)
                    _backward(perturbed_loss, weight, scaler)
                    perturbed_loss = perturbed_loss.detach()
                    ok = _all_finite(ok, perturbed_loss)
                    total = _add_weighted(total, perturbed_loss, weight)
            del logits
        return ok, total

    def _finish_step(
        self, scaler: torch.amp.GradScaler | None, clean_overflow: Tensor | None, ok: Tensor | None
    ) -> None:
        """Unscale the perturbed gradients, restore θ, step the base optimizer (or skip)."""
        if scaler is not None:
            assert clean_overflow is not None
            self._unscale_perturbed(scaler, clean_overflow)
        assert self._clean_ok is not None and ok is not None
        self._clean_ok = self._clean_ok & ok
        with torch.no_grad():
            self.second_step(_warn=scaler is None)
        if scaler is not None:
            scaler.update()

    # --- perturb_every: reusing the last direction -------------------------------------------

    def _fresh_perturbation_due(self) -> bool:
        if self.perturb_every == 1 or self._since_fresh is None:
            return True
        return self._since_fresh >= self.perturb_every

    @torch.no_grad()
    def _ascend_stored(self) -> None:
        """θ → θ + ρ·δ with the stored δ and each group's current ρ (θ kept for the restore)."""
        _check_group_rhos(self.param_groups)
        gathered = self._gather_params(lambda p: "perturb_direction" in self.state.get(p, {}))
        self._scratch = {}
        self._store_clean(gathered.params)
        self._perturbed = gathered
        device = gathered.params[0].device if gathered.params else torch.device("cpu")
        self._clean_ok = torch.ones((), dtype=torch.bool, device=device)
        directions = self._stored_directions(gathered.params)
        for start, end, rho in gathered.slices:
            if end > start:
                torch._foreach_add_(gathered.params[start:end], directions[start:end], alpha=rho)

    def _drop_stored_directions(self, keep: Iterable[Tensor] = ()) -> None:
        """Forget δ of every parameter not in ``keep``: a fresh step without a gradient for a
        parameter gave it ε = 0, and the steps that reuse this perturbation must too."""
        kept = set(keep)
        for p, state in self.state.items():
            if p not in kept:
                state.pop("perturb_direction", None)

    def _stored_directions(self, params: list[Tensor]) -> list[Tensor]:
        """δ per parameter (ε = ρ·δ), allocated on first use; kept in ``state`` for checkpoints."""
        for p in params:
            state = self.state[p]
            if "perturb_direction" not in state:
                state["perturb_direction"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )
        return [self.state[p]["perturb_direction"] for p in params]

    def _reuse_step(
        self,
        passes: list[tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]],
        scaler: torch.amp.GradScaler | None,
        no_sync: Callable[[], AbstractContextManager] | None,
    ) -> Tensor:
        """A step between fresh perturbations: θ + ρ·δ with the stored unit direction δ, one
        forward–backward there (the functional methods first take r(θ) from a no-grad clean
        forward), θ restored, the base optimizer steps."""
        self.zero_grad(set_to_none=True)
        weight = 1.0 / len(passes)
        rngs: list[RngState | None] = []
        dlogits: list[Tensor | None] = []
        clean_loss = None
        ok: Tensor | None = None
        for forward, loss_fn in passes:
            if not self.functional:  # one forward per micro-batch: no randomness to replay
                rngs.append(None)
                dlogits.append(None)
                continue
            rngs.append(RngState(self._cuda_devices()) if self.replay_rng else None)
            with torch.no_grad():
                logits = forward()
            logits = logits.detach().requires_grad_()
            with torch.enable_grad():
                loss = loss_fn(logits)
                _backward(loss, weight, scaler)
            dlogits.append(logits.grad)
            loss = loss.detach()
            clean_loss = _add_weighted(clean_loss, loss, weight)
            ok = _all_finite(ok, loss)

        self._ascend_stored()
        # No parameter has a clean gradient to unscale (and a fresh or just-loaded scaler has no
        # scale yet): the clean overflow flag is clear; a non-finite scaled r shows up in the
        # perturbed gradients instead.
        clean_overflow = None
        if scaler is not None:
            clean_overflow = torch.zeros(1, device=self._clean_ok.device)
        try:
            self.zero_grad(set_to_none=True)
            ok, perturbed_loss = self._perturbed_passes(
                passes, rngs, dlogits, weight, scaler, no_sync, ok
            )
        except BaseException:
            self.abort_step()
            raise
        self._finish_step(scaler, clean_overflow, ok)
        assert self._since_fresh is not None
        self._since_fresh += 1
        loss = clean_loss if clean_loss is not None else perturbed_loss
        assert loss is not None
        return loss

    @torch.no_grad()
    def _unscale_clean(self, scaler: torch.amp.GradScaler) -> Tensor:
        """Unscale the clean gradients in place; returns a found-inf flag (no host sync).

        Done by hand, not with ``scaler.unscale_``, which may run once per optimizer and
        update: that one call is kept for the perturbed gradients, so "unscale twice" never
        happens.
        """
        grads = [p.grad for p in self._params_with_grad()]
        inv_scale = scaler._scale.double().reciprocal().float()  # type: ignore[union-attr]
        return unscale_grads_(grads, inv_scale)

    @torch.no_grad()
    def _unscale_perturbed(self, scaler: torch.amp.GradScaler, clean_overflow: Tensor) -> None:
        """``scaler.unscale_`` on the perturbed gradients, seeing the clean pass's overflow too.

        A clean-pass overflow is folded in by turning the gradients into NaN (×1 otherwise, which
        is exact), so the scaler records it, backs off at ``update()``, and the step is skipped.
        """
        grads = [p.grad for p in self._params_with_grad()]
        if grads:
            poison = torch.where(clean_overflow.sum() > 0, float("nan"), 1.0)
            for device, device_grads in _by_device(grads).items():
                torch._foreach_mul_(device_grads, poison.to(device))
        scaler.unscale_(self)

    @torch.no_grad()
    def _ascend(self, first: bool) -> None:
        """Move θ to (the next) perturbed point from the gradients now in ``p.grad``."""
        if first:
            if self._perturbed is not None:  # a previous first_step was never completed
                self._restore()
            self._scratch = {}
            self._perturbed = self._gather_params()
            self._store_clean(self._perturbed.params)
        gathered = self._perturbed
        assert gathered is not None
        params = gathered.params
        _check_group_rhos(self.param_groups)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        u, n = self.direction(self, params, grads, self._scratch)
        norm = global_norm(n)
        if first:
            self._clean_ok = torch.isfinite(norm)

        if first and self.perturb_every > 1:
            self._drop_stored_directions(keep=params)
        if self.ascent_steps == 1:
            factor: Tensor | float = _inverse_norm(norm)
            if self.perturb_every > 1:  # keep the unit direction δ for the steps in between
                torch._foreach_mul_(u, factor)
                torch._foreach_copy_(self._stored_directions(params), u)
                factor = 1.0
            torch._foreach_add_(params, self._scale_by_group(gathered, u, factor))
            return
        # Multi-step: δ (ε = ρ·δ per group) accumulates K steps of size 1/K in the unit set.
        torch._foreach_mul_(u, _inverse_norm(norm) / self.ascent_steps)  # u is scratch here
        delta = self._scratch.setdefault("delta", [torch.zeros_like(p) for p in params])
        torch._foreach_add_(delta, u)
        metric = self.direction.metric(self._scratch)
        size = global_norm(torch._foreach_div(delta, metric) if metric is not None else delta)
        torch._foreach_mul_(delta, torch.clamp(_inverse_norm(size), max=1.0))
        torch._foreach_copy_(params, self._clean_list(params))
        if self.perturb_every > 1:
            torch._foreach_copy_(self._stored_directions(params), delta)
        torch._foreach_add_(
            params, self._scale_by_group(gathered, torch._foreach_mul(delta, 1.0), 1.0)
        )

    @staticmethod
    def _scale_by_group(
        gathered: _Gathered, u: list[Tensor], factor: Tensor | float
    ) -> list[Tensor]:
        """u ← ρ_group · factor · u in place, one foreach call per parameter group."""
        for start, end, rho in gathered.slices:
            if end > start:
                torch._foreach_mul_(u[start:end], factor * rho)
        return u

    def _restore(self) -> None:
        gathered = self._perturbed
        assert gathered is not None
        torch._foreach_copy_(gathered.params, self._clean_list(gathered.params))
        self._perturbed = None

    def _base_step(self, ok: Tensor | None, warn: bool = True) -> None:
        params = self._params_with_grad()
        grads = [p.grad for p in params]
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            grad_norm = global_norm(grads)
        ok = torch.isfinite(grad_norm) if ok is None else ok & torch.isfinite(grad_norm)
        scratch, self._scratch = self._scratch, {}

        self._last_step_taken = None  # unknown until decided below
        if not self.skip_nonfinite:
            self.base_optimizer.step()
            self.direction.commit(self, scratch)
            self._last_step_taken = True
            return
        if self._can_skip_on_device():
            # Fused Adam/AdamW/SGD leave params and moments untouched (and undo the step count)
            # when found_inf is set: the skip needs no host sync.
            not_ok = (~ok).to(torch.float32)
            self.base_optimizer.found_inf = not_ok  # type: ignore[attr-defined]
            try:
                self.base_optimizer.step()
            finally:
                del self.base_optimizer.found_inf  # type: ignore[attr-defined]
            skipped = self._skipped_device
            self._skipped_device = not_ok if skipped is None else skipped + not_ok
            return
        self._last_step_taken = bool(ok)  # the one host read of a step: was everything finite?
        if self._last_step_taken:
            self.base_optimizer.step()
            self.direction.commit(self, scratch)
        else:
            self._skipped_host += 1
            if not warn:  # an fp16 overflow: routine while GradScaler finds its scale
                return
            warnings.warn(
                f"{type(self).__name__}: non-finite loss or gradient, step skipped "
                f"(parameters and optimizer state unchanged; {self.skipped_steps} skipped so far)",
                NonFiniteStepWarning,
                stacklevel=4,
            )

    # --- helpers ------------------------------------------------------------------------------

    def _can_skip_on_device(self) -> bool:
        return (
            not self.direction.stateful
            and getattr(self.base_optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused", False) for g in self.param_groups)
        )

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

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _gather_params(self, include: Callable[[Tensor], bool] = _has_grad) -> _Gathered:
        """The parameters ``include`` selects (by default those with a gradient), grouped like
        ``param_groups``, with each group's current ρ."""
        params: list[Tensor] = []
        slices: list[tuple[int, int, float]] = []
        for g in self.param_groups:
            start = len(params)
            params.extend(p for p in g["params"] if include(p))
            slices.append((start, len(params), g["rho"]))
        return _Gathered(params, slices)

    def _store_clean(self, params: list[Tensor]) -> None:
        torch._foreach_copy_(self._clean_list(params), params)

    def _clean_list(self, params: list[Tensor]) -> list[Tensor]:
        copies = self._clean_copies
        for p in params:
            if p not in copies:
                copies[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return [copies[p] for p in params]

    def _cuda_devices(self) -> list[int]:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return []
        return sorted(
            {p.device.index or 0 for g in self.param_groups for p in g["params"] if p.is_cuda}
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, "
            f"rho={self.defaults['rho']}, direction={self.direction}, functional={self.functional}"
            + (f", perturb_every={self.perturb_every})" if self.perturb_every > 1 else ")")
        )


def unscale_grads_(grads: list[Tensor], inv_scale: Tensor) -> Tensor:
    """Gradients × inv_scale in place (as GradScaler unscales, per device, no host sync); returns a
    1-element flag, > 0 if any gradient was non-finite."""
    found = torch.zeros(1, device=inv_scale.device)
    for device, device_grads in _by_device(grads).items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(device_grads, flag, inv_scale.to(device))
        found += flag.to(found.device)
    return found


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def _backward(loss: Tensor, weight: float, scaler: torch.amp.GradScaler | None) -> None:
    if weight != 1.0:
        loss = loss * weight
    if scaler is not None:
        loss = scaler.scale(loss)
    loss.backward()


def _loss_of_micro_batch(loss_fn: Callable[..., Tensor], mb: Any, logits: Tensor) -> Tensor:
    return loss_fn(logits, mb)


def _add_weighted(total: Tensor | None, loss: Tensor, weight: float) -> Tensor:
    """total + weight·loss, starting from None (the running mean of micro-batch losses)."""
    return loss * weight if total is None else total + loss * weight


def _all_finite(ok: Tensor | None, value: Tensor) -> Tensor:
    finite = torch.isfinite(value).all()
    return finite if ok is None else ok & finite


def _check_rho(rho: object) -> None:
    if (
        isinstance(rho, bool)
        or not isinstance(rho, (int, float))
        or not math.isfinite(rho)
        or rho < 0
    ):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def _check_group_rhos(groups: list[dict[str, Any]]) -> None:
    for i, g in enumerate(groups):
        try:
            _check_rho(g["rho"])
        except ValueError as e:
            raise ValueError(f"param_groups[{i}]: {e}") from None
