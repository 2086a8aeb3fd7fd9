"""Direction rules: how each method turns the clean gradient g into its perturbation ε.

Every rule returns ``(u, n)`` for the parameters that have a gradient, and the engine sets
``ε = ρ · u / ‖n‖`` per parameter group (‖·‖ the global L2 norm over all groups):

====================  =====================  ===============
rule                  u                      n
====================  =====================  ===============
SAM                   g                      g
ASAM (adaptive)       T² g,  T = |θ| + η     T g
preconditioned        P⁻¹ g                  P⁻¹ g
GA-SAM                D² g,  D = (ŝ + ξ)^α   D g
====================  =====================  ===============

The rules are pure foreach maths on lists of tensors. They may overwrite the gradient tensors in
place (the engine no longer needs g once ε exists), which is how SAM needs no extra buffer at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flatlm.optim.engine import SharpnessAwareOptimizer

__all__ = [
    "AdaptiveDirection",
    "Direction",
    "EuclideanDirection",
    "GradientStrengthDirection",
    "PreconditionedDirection",
    "adam_preconditioner",
    "global_norm",
    "register_preconditioner",
]


def global_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of a list of tensors seen as one vector, as a 0-dim tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)


class Direction(Protocol):
    """How ε's direction is made. ``stateful`` rules keep state in ``opt.state`` (saved with it)."""

    stateful: bool

    def validate(self, opt: SharpnessAwareOptimizer) -> None:
        """Raise at construction if the rule cannot work with this optimizer."""

    def __call__(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Return ``(u, n)`` (lists aligned with ``params``); may reuse ``grads`` in place.

        ``scratch`` is cleared by the engine at the start of every step; a rule keeps there what
        later ascent steps of the same step, or ``commit``, need.
        """
        ...

    def metric(self, scratch: dict) -> list[Tensor] | None:
        """M of the corruption set ‖ε ⊘ M‖ ≤ ρ (None: the L2 ball), for multi-step projection."""
        ...

    def commit(self, opt: SharpnessAwareOptimizer, scratch: dict) -> None:
        """Make the rule's state update of this step permanent (called only if the step is taken)."""
        ...


class _StatelessRule:
    stateful = False

    def validate(self, opt: SharpnessAwareOptimizer) -> None:
        return None

    def metric(self, scratch: dict) -> list[Tensor] | None:
        return None

    def commit(self, opt: SharpnessAwareOptimizer, scratch: dict) -> None:
        return None


@dataclass(frozen=True)
class EuclideanDirection(_StatelessRule):
    """SAM: ε ∝ g, the first-order maximiser over the L2 ball."""

    def __call__(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> tuple[list[Tensor], list[Tensor]]:
        return grads, grads


@dataclass(frozen=True)
class AdaptiveDirection(_StatelessRule):
    """ASAM (Kwon et al. 2021): scale-invariant ellipsoid, T = |θ| + η elementwise."""

    eta: float = 0.01

    def validate(self, opt: SharpnessAwareOptimizer) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def __call__(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> tuple[list[Tensor], list[Tensor]]:
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, self.eta)
        torch._foreach_mul_(grads, scale)  # grads now hold T g
        u = torch._foreach_mul(grads, scale)  # T² g
        return u, grads


# --- preconditioners read from the base optimizer's own state ------------------------------------

#: ``fn(base_optimizer, params) -> list[Tensor | None]``: P per parameter, None where the base
#: optimizer has no state yet for it (then P = I there).
PreconditionerFn = Callable[[torch.optim.Optimizer, list[Tensor]], list[Tensor | None]]
_PRECONDITIONERS: dict[type[torch.optim.Optimizer], PreconditionerFn] = {}


def _bias_corrections(beta: float, steps: list[Tensor]) -> list[Tensor]:
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


@torch.no_grad()
def adam_preconditioner(base: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
    """P = √v̂ + eps with v̂ = v / (1 − β₂ᵗ), the denominator Adam/AdamW divide by.

    With ``amsgrad`` the running maximum of v is what Adam divides by, so that is used.
    """
    out: list[Tensor | None] = [None] * len(params)
    index = {p: i for i, p in enumerate(params)}
    for group in base.param_groups:
        beta2 = float(group["betas"][1])
        eps = float(group["eps"])
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        idx, second_moments, steps = [], [], []
        for p in group["params"]:
            i = index.get(p)
            state = base.state.get(p)
            if i is None or not state or key not in state:
                continue
            idx.append(i)
            second_moments.append(state[key])
            steps.append(state["step"])
        if not idx:
            continue
        precond = torch._foreach_div(second_moments, _bias_corrections(beta2, steps))
        torch._foreach_sqrt_(precond)
        torch._foreach_add_(precond, eps)
        for i, pc in zip(idx, precond, strict=True):
            out[i] = pc
    return out


register_preconditioner(torch.optim.Adam, adam_preconditioner)
register_preconditioner(torch.optim.AdamW, adam_preconditioner)
register_preconditioner(torch.optim.NAdam, adam_preconditioner)
register_preconditioner(torch.optim.RAdam, adam_preconditioner)


@dataclass(frozen=True)
class PreconditionedDirection(_StatelessRule):
    """ε ∝ P⁻¹ g, P the base optimizer's own preconditioner; P = I until its state exists."""

    def validate(self, opt: SharpnessAwareOptimizer) -> None:
        base_cls = type(opt.base_optimizer)
        if find_preconditioner(base_cls) is None:
            known = ", ".join(sorted(c.__name__ for c in _PRECONDITIONERS))
            raise TypeError(
                f"{type(opt).__name__} preconditions ε with the base optimizer's second moment, "
                f"but {base_cls.__name__} keeps none that flatlm knows how to read (known: {known}). "
                "Use one of those, or teach flatlm with "
                "flatlm.optim.register_preconditioner(YourOptimizer, fn)."
            )

    def __call__(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> tuple[list[Tensor], list[Tensor]]:
        fn = find_preconditioner(type(opt.base_optimizer))
        assert fn is not None  # validated at construction
        precond = fn(opt.base_optimizer, params)
        with_state = [g for g, pc in zip(grads, precond, strict=True) if pc is not None]
        if with_state:
            torch._foreach_div_(with_state, [pc for pc in precond if pc is not None])
        return grads, grads


@dataclass(frozen=True)
class GradientStrengthDirection(_StatelessRule):
    """GA-SAM (flatlm's formulation): ellipsoid ‖ε ⊘ D‖ ≤ ρ with D = (ŝ + ξ)^α.

    s is the bias-corrected RMS of each element's gradient over time (EMA with ``beta``) and
    ŝ = s / RMS(s), the RMS over all elements. D = clip((ŝ + ξ)^α) with clip to
    [1/max_scale, max_scale]: with α < 0, D would otherwise grow without bound where the gradient
    strength is near zero, and as ‖ε‖ ≤ ρ·max D the clip is what keeps every step finite.
    With ``normalize=False`` D is further multiplied by clip(RMS(s)^α), so the set also grows and
    shrinks with the overall gradient strength over training (≈ (s + ξ)^α, bounded).
    """

    alpha: float = -1.0
    beta: float = 0.99
    normalize: bool = True
    xi: float = 1e-12
    max_scale: float = 100.0
    stateful = True

    def validate(self, opt: SharpnessAwareOptimizer) -> None:
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if not (math.isfinite(self.xi) and self.xi >= 0):
            raise ValueError(f"xi must be a finite number >= 0, got {self.xi!r}")
        if not (math.isfinite(self.max_scale) and self.max_scale >= 1):
            raise ValueError(f"max_scale must be a finite number >= 1, got {self.max_scale!r}")

    @torch.no_grad()
    def strength_scale(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> list[Tensor]:
        """D for ``params`` from the EMA including this step's gradient (not yet committed).

        The updated EMA waits in ``scratch`` and is committed only when the step is taken, so a
        skipped (non-finite) step leaves the state untouched.
        """
        # Read-only here: a parameter seen for the first time starts from EMA 0 at step 0.
        states = [opt.state.get(p, {}) for p in params]
        old_emas = [
            st["grad_sq_ema"] if "grad_sq_ema" in st else torch.zeros_like(p)
            for p, st in zip(params, states, strict=True)
        ]
        old_steps = [st["step"] if "step" in st else torch.zeros(()) for st in states]
        emas = torch._foreach_mul(old_emas, self.beta)
        torch._foreach_addcmul_(emas, grads, grads, value=1.0 - self.beta)
        steps = torch._foreach_add(old_steps, 1.0)
        scratch.update(grad_sq_ema=emas, step=steps, params=params)

        # s = sqrt(EMA / (1 − βᵗ))
        strength = torch._foreach_div(emas, _bias_corrections(self.beta, steps))
        torch._foreach_sqrt_(strength)
        numel = sum(s.numel() for s in strength)
        rms = global_norm(strength) / math.sqrt(max(numel, 1))
        # RMS 0 means every gradient so far was zero: ŝ = 0 then, and so is ε.
        rms = rms.clamp_min(torch.finfo(rms.dtype).tiny)
        torch._foreach_div_(strength, rms)  # ŝ, relative strength
        torch._foreach_add_(strength, self.xi)
        torch._foreach_pow_(strength, self.alpha)
        torch._foreach_clamp_min_(strength, 1.0 / self.max_scale)
        torch._foreach_clamp_max_(strength, self.max_scale)
        if not self.normalize:  # the overall strength scales the set too, within the same bounds
            torch._foreach_mul_(
                strength, rms.pow(self.alpha).clamp(1 / self.max_scale, self.max_scale)
            )
        return strength

    def __call__(
        self,
        opt: SharpnessAwareOptimizer,
        params: list[Tensor],
        grads: list[Tensor],
        scratch: dict,
    ) -> tuple[list[Tensor], list[Tensor]]:
        scale = scratch.get("D")
        if scale is None:  # the clean pass: D from the gradient strength including this step
            scale = scratch["D"] = self.strength_scale(opt, params, grads, scratch)
        torch._foreach_mul_(grads, scale)  # D g
        u = torch._foreach_mul(grads, scale)  # D² g
        return u, grads

    def metric(self, scratch: dict) -> list[Tensor] | None:
        return scratch.get("D")

    @torch.no_grad()
    def commit(self, opt: SharpnessAwareOptimizer, scratch: dict) -> None:
        if "grad_sq_ema" not in scratch:
            return
        # The pending tensors are fresh (not views of the old state), so they can simply be kept.
        pending = zip(scratch["params"], scratch["grad_sq_ema"], scratch["step"], strict=True)
        for p, ema, step in pending:
            state = opt.state[p]
            state["grad_sq_ema"] = ema
            state["step"] = step
