"""Direction rules: how each method turns the clean gradient g into its perturbation ε.

A rule is pure: it gets the parameters, their gradients, their saved per-parameter state and the
base optimizer's geometry (:class:`~flatlm.optim.preconditioners.BaseGeometry`), and returns
``(u, n)``; the engine sets ``ε = ρ · u / ‖n‖`` per parameter group (‖·‖ the global L2 norm over
all groups):

====================  =====================  ===============
rule                  u                      n
====================  =====================  ===============
SAM                   g                      g
scaled by T           T² g                   T g
  ASAM                T = |θ| + η
  GA-SAM              T = D = (ŝ + ξ)^α
preconditioned        P⁻¹ g                  P⁻¹ g
  bSAM (P = s)        P⁻¹ g                  none: ε = ρ·u
momentum (MSAM)       −m                     −m
  preconditioned      −P⁻¹ m                 −P⁻¹ m
FriendlySAM           g − σ m                g − σ m
GCSAM                 GC(g)                  GC(g)
====================  =====================  ===============

(FriendlySAM's m is its own EMA of past clean gradients; GC subtracts from each row of a
weight its mean, Yong et al. 2020.)

A momentum rule (``needs_gradient = False``) takes the base optimizer's momentum m, which exists
before the step, in place of a clean gradient: its ``source`` supplies the vectors the engine
then hands to ``prepare`` and ``__call__`` where the gradient would go, so the step needs no
clean backward.

One step of a rule has two parts. ``prepare`` runs once per step on the clean gradient and
returns a :class:`Prepared`: what the step's ascent steps share (T, P) and the rule's new state,
which the engine saves only if the step is taken. ``__call__`` maps a gradient to ``(u, n)``
with it. The maths is foreach ops on lists of tensors; a rule may overwrite ``grads`` in place
(the engine no longer needs g once ε exists), which is how SAM needs no extra buffer at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from flatlm.optim import sharded
from flatlm.optim.preconditioners import (
    BaseGeometry,
    bias_corrections,
    known_momenta,
    known_preconditioners,
)

__all__ = [
    "AdaptiveDirection",
    "CentralizedDirection",
    "Direction",
    "EuclideanDirection",
    "FriendlyDirection",
    "GradientStrengthDirection",
    "MomentumDirection",
    "PreconditionedDirection",
    "Prepared",
    "ScaledDirection",
    "global_norm",
]

#: A rule's saved state, one mapping per parameter (empty for a parameter seen the first time).
ParamState = Sequence[Mapping[str, Tensor]]


def global_norm(tensors: list[Tensor]) -> Tensor:
    """L2 norm of a list of tensors seen as one vector, as a 0-dim tensor (no host sync).

    Under FSDP2 the tensors are this rank's shards and the squares are summed over the shard
    group (one scalar all-reduce, :mod:`~flatlm.optim.sharded`)."""
    if not tensors:
        return torch.zeros(())
    if sharded.reduces():
        return sharded.sum_over_shards(sharded.sum_of_squares(tensors)).sqrt()
    return torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)


def root_mean_square(tensors: list[Tensor]) -> Tensor:
    """√(mean of the squares of every element of every tensor), over all shards under FSDP2."""
    if sharded.reduces():  # the squares and the element count in one all-reduce
        device = tensors[0].device if tensors else torch.device("cpu")
        count = torch.tensor(float(sum(t.numel() for t in tensors)), device=device)
        partial = sharded.sum_of_squares(tensors) if tensors else torch.zeros((), device=device)
        total = sharded.sum_over_shards(torch.stack([partial, count.to(partial.dtype)]))
        return total[0].sqrt() / total[1].clamp_min(1.0).sqrt()
    numel = sum(t.numel() for t in tensors)
    return global_norm(tensors) / math.sqrt(max(numel, 1))


def _divide_(vectors: list[Tensor], precond: list[Tensor | None]) -> None:
    """vectors ← P⁻¹ vectors in place, where P is known (None: P = I)."""
    with_p = [v for v, pc in zip(vectors, precond, strict=True) if pc is not None]
    if with_p:
        torch._foreach_div_(with_p, [pc for pc in precond if pc is not None])


@dataclass
class Prepared:
    """What a rule derived from one step's clean gradient.

    ``scale``: T of a scaled rule, whose corruption set is ‖ε ⊘ T‖ ≤ ρ. ``precond``: P per parameter (None: P = I). ``new_state``: the
    rule's per-parameter state after this step, by key, aligned with the parameters.
    ``shift``: a vector taken from the gradient before it is used (FriendlySAM's σ·m; None
    where there is none).
    """

    scale: list[Tensor] | None = None
    precond: list[Tensor | None] | None = None
    new_state: dict[str, list[Tensor]] | None = None
    shift: list[Tensor | None] | None = None


class Direction:
    """How ε's direction is made (the base of every rule; it keeps no state).

    ``stateful`` rules keep per-parameter state (saved in the optimizer's ``state``), which an
    on-device skip could not undo.
    """

    stateful: ClassVar[bool] = False
    #: False for a rule that makes ε without a clean gradient (``source`` supplies its input).
    needs_gradient: ClassVar[bool] = True
    #: False: ε = ρ·u, not scaled to radius ρ (bSAM's ε = ρ·g/s).
    to_radius: bool = True

    def validate(self, geometry: BaseGeometry) -> None:
        """Raise at construction if the rule cannot work with this base optimizer."""
        return None

    def source(self, params: list[Tensor], geometry: BaseGeometry) -> list[Tensor | None]:
        """The vectors a rule without a gradient starts from (fresh tensors, one per parameter;
        None where there is none yet: ε = 0 there)."""
        raise NotImplementedError

    def prepare(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: ParamState,
        geometry: BaseGeometry,
    ) -> Prepared:
        """What this step's ascent steps share, from the clean gradient; changes nothing."""
        return Prepared()

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Return ``(u, n)`` (lists aligned with ``params``); may reuse ``grads`` in place."""
        raise NotImplementedError


@dataclass(frozen=True)
class EuclideanDirection(Direction):
    """SAM: ε ∝ g, the first-order maximiser over the L2 ball."""

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        return grads, grads


class ScaledDirection(Direction):
    """ε ∝ T²g / ‖Tg‖: the first-order maximiser over the ellipsoid ‖ε ⊘ T‖ ≤ ρ.

    A subclass says what T is (``scale``); T is fixed for the step from the clean point.
    ``radius = "euclidean"`` keeps the ellipsoid's direction but makes ρ its Euclidean length,
    ε = ρ T²g / ‖T²g‖, so ρ means what it means for SAM (the set is then the L2 ball).
    """

    radius: str = "ellipsoid"

    def scale(
        self, params: list[Tensor], grads: list[Tensor], state: ParamState
    ) -> tuple[list[Tensor], dict[str, list[Tensor]] | None]:
        """T per parameter, and the rule's new state (None if it keeps none)."""
        raise NotImplementedError

    def prepare(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: ParamState,
        geometry: BaseGeometry,
    ) -> Prepared:
        scale, new_state = self.scale(params, grads, state)
        return Prepared(scale=scale, new_state=new_state)

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        assert prepared.scale is not None
        torch._foreach_mul_(grads, prepared.scale)  # T g
        u = torch._foreach_mul(grads, prepared.scale)  # T² g
        return (u, grads) if self.radius == "ellipsoid" else (u, u)


@dataclass(frozen=True)
class AdaptiveDirection(ScaledDirection):
    """ASAM (Kwon et al. 2021): scale-invariant ellipsoid, T = |θ| + η elementwise on the
    tensors ``is_weight`` selects (every tensor when None) and T = 1 on the others."""

    eta: float = 0.01
    is_weight: Callable[[Tensor], bool] | None = None

    def validate(self, geometry: BaseGeometry) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def scale(
        self, params: list[Tensor], grads: list[Tensor], state: ParamState
    ) -> tuple[list[Tensor], None]:
        if self.is_weight is None:
            scale = torch._foreach_abs(params)
            torch._foreach_add_(scale, self.eta)
            return scale, None
        weights = [p for p in params if self.is_weight(p)]
        scaled = iter(torch._foreach_add(torch._foreach_abs(weights), self.eta) if weights else [])
        return [next(scaled) if self.is_weight(p) else torch.ones_like(p) for p in params], None


@dataclass(frozen=True)
class PreconditionedDirection(Direction):
    """ε ∝ P⁻¹ g, P the base optimizer's own preconditioner (the denominator of its update).

    ``moment="current"`` (default): P from this step's second moment, the clean gradient folded
    in, as the base optimizer will divide by it in this update: |P⁻¹g| is bounded per
    coordinate and a coordinate it has never seen gets P = |g| + eps, not eps. ``"previous"``:
    the second moment before this step (P = I for a parameter without state yet), as flatlm
    did before 0.2: a coordinate seen for the first time is then amplified by 1/eps.
    ``to_radius=False``: ε = ρ·P⁻¹g as it is (bSAM, P = its scale s), not scaled to length ρ.
    """

    moment: str = "current"
    to_radius: bool = True

    def validate(self, geometry: BaseGeometry) -> None:
        if self.moment not in ("current", "previous"):
            raise ValueError(f"moment must be 'current' or 'previous', got {self.moment!r}")
        if not geometry.has_preconditioner:
            raise TypeError(
                f"this method preconditions ε with the base optimizer's second moment, but "
                f"{geometry.base_name} keeps none that flatlm knows how to read (known: "
                f"{', '.join(known_preconditioners())}). Use one of those, or teach flatlm with "
                "flatlm.optim.register_preconditioner(YourOptimizer, fn)."
            )

    def prepare(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: ParamState,
        geometry: BaseGeometry,
    ) -> Prepared:
        current = grads if self.moment == "current" else None
        return Prepared(precond=geometry.preconditioner(params, current))

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        assert prepared.precond is not None
        _divide_(grads, prepared.precond)
        return grads, grads


@dataclass(frozen=True)
class MomentumDirection(Direction):
    """Momentum-SAM (Becker, Altrock & Risse 2024): ε ∝ −m, m the base optimizer's momentum
    before this step (AdamW's ``exp_avg``, SGD's ``momentum_buffer``), as their code does: the
    perturbed point is θ − ρ m/‖m‖. ``preconditioned=True``: ε ∝ −P⁻¹m with the base
    optimizer's previous-step P (flatlm's one-pass form of the preconditioned methods), the
    direction of its own next update.

    A parameter without momentum yet (every parameter at the first step) gets ε = 0.
    """

    preconditioned: bool = False
    needs_gradient: ClassVar[bool] = False

    def validate(self, geometry: BaseGeometry) -> None:
        if geometry.momentum_key is None:
            raise TypeError(
                f"this method perturbs along the base optimizer's momentum, but "
                f"{geometry.base_name} keeps none that flatlm knows how to read (known: "
                f"{', '.join(known_momenta())}). Use one of those, or teach flatlm with "
                "flatlm.optim.register_momentum(YourOptimizer, state_key)."
            )
        missing = geometry.groups_without_momentum()
        if missing:
            raise ValueError(
                f"param_groups {missing} have momentum=0, so {geometry.base_name} keeps no "
                "momentum to perturb along: set momentum > 0 (e.g. 0.9)"
            )
        if self.preconditioned:
            PreconditionedDirection("previous").validate(geometry)

    @torch.no_grad()
    def source(self, params: list[Tensor], geometry: BaseGeometry) -> list[Tensor | None]:
        momenta = geometry.momentum(params)
        present = [m for m in momenta if m is not None]
        negated = iter(torch._foreach_neg(present) if present else [])
        return [None if m is None else next(negated) for m in momenta]

    def prepare(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: ParamState,
        geometry: BaseGeometry,
    ) -> Prepared:
        if not self.preconditioned:
            return Prepared()
        return Prepared(precond=geometry.preconditioner(params, None))

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        if prepared.precond is not None:
            _divide_(grads, prepared.precond)
        return grads, grads


@dataclass(frozen=True)
class GradientStrengthDirection(ScaledDirection):
    """GA-SAM (flatlm's formulation): ellipsoid ‖ε ⊘ D‖ ≤ ρ with D = (ŝ + ξ)^α.

    s is the bias-corrected RMS of each element's gradient over time (EMA with ``beta``) and
    ŝ = s / RMS(s), the RMS over all elements. D = clip((ŝ + ξ)^α) with clip to
    [1/max_scale, max_scale]: with α < 0, D would otherwise grow without bound where the gradient
    strength is near zero, and as ‖ε‖ ≤ ρ·max D the clip is what keeps every step finite.
    With ``normalize=False`` D is further multiplied by clip(RMS(s)^α), so the set also grows and
    shrinks with the overall gradient strength over training (≈ (s + ξ)^α, bounded).
    """

    alpha: float = 1.0
    beta: float = 0.99
    normalize: bool = True
    xi: float = 1e-12
    max_scale: float = 100.0
    radius: str = "euclidean"
    stateful: ClassVar[bool] = True

    def validate(self, geometry: BaseGeometry) -> None:
        if self.radius not in ("euclidean", "ellipsoid"):
            raise ValueError(f"radius must be 'euclidean' or 'ellipsoid', got {self.radius!r}")
        if not self.normalize and self.radius == "euclidean":
            raise ValueError(
                "normalize=False scales D by one global factor, which a Euclidean radius "
                "normalises away (it would change nothing): use it with radius='ellipsoid'"
            )
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
        if not (math.isfinite(self.xi) and self.xi >= 0):
            raise ValueError(f"xi must be a finite number >= 0, got {self.xi!r}")
        if not (math.isfinite(self.max_scale) and self.max_scale >= 1):
            raise ValueError(f"max_scale must be a finite number >= 1, got {self.max_scale!r}")

    @torch.no_grad()
    def scale(
        self, params: list[Tensor], grads: list[Tensor], state: ParamState
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """D from the EMA including this step's gradient; the updated EMA is the new state.

        A parameter seen for the first time starts from EMA 0 at step 0.
        """
        old_emas = [
            st["grad_sq_ema"] if "grad_sq_ema" in st else torch.zeros_like(p)
            for p, st in zip(params, state, strict=True)
        ]
        old_steps = [st["step"] if "step" in st else torch.zeros(()) for st in state]
        emas = torch._foreach_mul(old_emas, self.beta)
        torch._foreach_addcmul_(emas, grads, grads, value=1.0 - self.beta)
        steps = torch._foreach_add(old_steps, 1.0)

        # s = sqrt(EMA / (1 − βᵗ))
        strength = torch._foreach_div(emas, bias_corrections(self.beta, steps))
        torch._foreach_sqrt_(strength)
        rms = root_mean_square(strength)
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
        return strength, {"grad_sq_ema": emas, "step": steps}


@dataclass(frozen=True)
class FriendlyDirection(Direction):
    """FriendlySAM (Li et al., CVPR 2024): ε ∝ d = g − σ·m, the batch-specific part of the
    gradient, m an EMA of the clean gradients with momentum λ (``lmbda``).

    As the authors' code (nblt/F-SAM) does it: at a parameter's first step m = g and d = g (SAM);
    after that d = g − σ·m_{t−1}, then m_t = λ·m_{t−1} + (1 − λ)·g. m is saved only if the step
    is taken (a skipped step leaves it as it was).
    """

    sigma: float = 1.0
    lmbda: float = 0.9
    stateful: ClassVar[bool] = True

    def validate(self, geometry: BaseGeometry) -> None:
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma!r}")
        if not 0.0 <= self.lmbda < 1.0:
            raise ValueError(f"lmbda must be in [0, 1), got {self.lmbda!r}")

    @torch.no_grad()
    def prepare(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: ParamState,
        geometry: BaseGeometry,
    ) -> Prepared:
        seen = [i for i, st in enumerate(state) if "friendly_momentum" in st]
        momenta: list[Tensor] = [g.clone() for g in grads]  # m = g where none is saved yet
        shift: list[Tensor | None] = [None] * len(grads)
        if seen:
            old = [state[i]["friendly_momentum"] for i in seen]
            scaled = torch._foreach_mul(old, self.sigma)
            new = torch._foreach_mul(old, self.lmbda)
            torch._foreach_add_(new, [grads[i] for i in seen], alpha=1.0 - self.lmbda)
            for i, s, m in zip(seen, scaled, new, strict=True):
                shift[i], momenta[i] = s, m
        return Prepared(new_state={"friendly_momentum": momenta}, shift=shift)

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        assert prepared.shift is not None
        pairs = [(g, s) for g, s in zip(grads, prepared.shift, strict=True) if s is not None]
        if pairs:
            torch._foreach_sub_([g for g, _ in pairs], [s for _, s in pairs])
        return grads, grads


def centralize_(grads: list[Tensor]) -> None:
    """Gradient centralisation (Yong et al., ECCV 2020) in place: each tensor of two or more
    dimensions loses its mean over every dimension but the first (each output row's mean); 1-D
    tensors (biases, gains) are left as they are. Under FSDP2 a shard holds whole rows (dim-0
    sharding), so the means are local."""
    for g in grads:
        if g.dim() > 1:
            g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))


@dataclass(frozen=True)
class CentralizedDirection(Direction):
    """GCSAM (Hassan et al. 2025): SAM with the clean gradient centralised before ε is made,
    ε = ρ·GC(g)/‖GC(g)‖ (:func:`centralize_`); the descent gradient is the perturbed one as
    it is."""

    def __call__(
        self, params: list[Tensor], grads: list[Tensor], prepared: Prepared
    ) -> tuple[list[Tensor], list[Tensor]]:
        centralize_(grads)
        return grads, grads
