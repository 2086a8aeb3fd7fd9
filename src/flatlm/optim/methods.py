"""The public methods: each is the engine with one direction rule and one gradient rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.bsam import BSAMBase
from flatlm.optim.combination import NoisyScale, SurrogateGap, WeightedSharpness
from flatlm.optim.directions import (
    AdaptiveDirection,
    CentralizedDirection,
    EuclideanDirection,
    FriendlyDirection,
    GradientStrengthDirection,
    MomentumDirection,
    PreconditionedDirection,
)
from flatlm.optim.engine import SharpnessAwareOptimizer

__all__ = [
    "ASAM",
    "BSAM",
    "GASAM",
    "GCSAM",
    "GSAM",
    "MSAM",
    "SAM",
    "WSAM",
    "FriendlySAM",
    "FunctionalSAM",
    "MomentumFunctionalSAM",
    "MomentumPreconditionedFunctionalSAM",
    "PreconditionedFunctionalSAM",
    "PreconditionedSAM",
]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]
AdamW = torch.optim.AdamW


class SAM(SharpnessAwareOptimizer):
    """SAM (Foret et al. 2021): ε = ρ g/‖g‖, descent with ∇L(θ+ε).

    ``adaptive=True`` is flatlm's earlier ASAM variant, T = |θ| + eta on *every* tensor; for
    ASAM as Kwon et al. published it use :class:`ASAM`. Engine options (``max_grad_norm``,
    ``replay_rng``, ``skip_nonfinite`` …) pass through ``**kw``; everything else in ``**kw``
    goes to ``base_optimizer``.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **kw: Any,
    ):
        direction = AdaptiveDirection(eta) if adaptive else EuclideanDirection()
        super().__init__(params, base_optimizer, rho=rho, direction=direction, **kw)


def _is_weight(p: Tensor) -> bool:
    return p.dim() >= 2


class ASAM(SharpnessAwareOptimizer):
    """ASAM as Kwon et al. (2021) published it: ε = ρ T²g/‖Tg‖ with T = |w| + η on the weights
    and T = 1 on every other tensor (biases, normalisation gains), η = 0.01, ρ = 0.5 by default
    (T shrinks ε, so ASAM's ρ is larger than SAM's).

    ``is_weight(p)`` decides what counts as a weight: tensors with two or more dimensions by
    default. (The reference code tests ``'weight' in name``, which also scales normalisation
    gains; pass a predicate to match it.)
    """

    DEFAULT_RHO = 0.5

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = DEFAULT_RHO,
        eta: float = 0.01,
        is_weight: Callable[[Tensor], bool] = _is_weight,
        **kw: Any,
    ):
        direction = AdaptiveDirection(eta, is_weight=is_weight)
        super().__init__(params, base_optimizer, rho=rho, direction=direction, **kw)


class FunctionalSAM(SharpnessAwareOptimizer):
    """Functional-SAM: ε = ρ g/‖g‖, descent with J(θ+ε)ᵀ r(θ) (clean dlogits, moved Jacobian)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        **kw: Any,
    ):
        super().__init__(
            params, base_optimizer, rho=rho, direction=EuclideanDirection(), functional=True, **kw
        )


class PreconditionedSAM(SharpnessAwareOptimizer):
    """SAM with ε = ρ P⁻¹g/‖P⁻¹g‖, P = √v̂ + eps from the base Adam/AdamW state: by default
    this step's second moment (``moment="current"``), ``"previous"`` for the one before it."""

    _functional = False

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        moment: str = "current",
        **kw: Any,
    ):
        direction = PreconditionedDirection(moment)
        super().__init__(
            params, base_optimizer, rho=rho, direction=direction, functional=self._functional, **kw
        )


class PreconditionedFunctionalSAM(PreconditionedSAM):
    """Functional-SAM's gradient rule with Preconditioned SAM's direction."""

    _functional = True


class GASAM(SharpnessAwareOptimizer):
    """GA-SAM, in flatlm's formulation of its principle (not a line-by-line reproduction).

    The corruption set is the ellipsoid ‖ε ⊘ D‖ ≤ ρ with D = (ŝ + ξ)^α, ŝ the bias-corrected
    RMS of each element's gradient over time (EMA ``beta``), relative to its RMS over all elements
    when ``normalize``. D is clamped to [1/max_scale, max_scale] so no α gives a non-finite step.
    ``radius="euclidean"`` (default): ε = ρ D²g/‖D²g‖, the ellipsoid's direction with Euclidean
    length ρ, so ρ means what it means for SAM and α is compared at a matched radius;
    ``"ellipsoid"``: ε = ρ D²g/‖Dg‖ (ρ bounds ‖ε ⊘ D‖; ‖ε‖ can reach ρ·max_scale).
    ``ascent_steps=K`` takes K ascent steps of size ρ/K. α = 0 is SAM; α = 1 (default) follows
    the stated principle, strong-gradient coordinates corrupted more; α = −½ is Adam-like.
    See docs/algorithms.md for how the default was chosen.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        alpha: float = 1.0,
        beta: float = 0.99,
        normalize: bool = True,
        ascent_steps: int = 1,
        xi: float = 1e-12,
        max_scale: float = 100.0,
        radius: str = "euclidean",
        **kw: Any,
    ):
        direction = GradientStrengthDirection(
            alpha=alpha, beta=beta, normalize=normalize, xi=xi, max_scale=max_scale, radius=radius
        )
        super().__init__(
            params, base_optimizer, rho=rho, direction=direction, ascent_steps=ascent_steps, **kw
        )


class MSAM(SharpnessAwareOptimizer):
    """Momentum-SAM (Becker, Altrock & Risse 2024): ε = −ρ m/‖m‖ along the base optimizer's
    momentum m (AdamW's ``exp_avg``) as it stands before the step, descent with ∇L(θ+ε): one
    forward–backward per step, at θ + ε, plus the exact restore. There is no momentum at the
    first step, so it is a plain base-optimizer step (ε = 0). ``preconditioned=True``: ε ∝ −P⁻¹m
    with the previous step's P (flatlm's variant, not in the paper). ``step`` returns L(θ+ε).

    The paper's AdamW code uses ρ between 0.1 and 3 (larger than SAM's): tune ρ, see
    docs/results.md.
    """

    _functional = False
    _preconditioned = False

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        preconditioned: bool | None = None,
        **kw: Any,
    ):
        pre = self._preconditioned if preconditioned is None else preconditioned
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            direction=MomentumDirection(preconditioned=pre),
            functional=self._functional,
            **kw,
        )


class MomentumFunctionalSAM(MSAM):
    """One-pass Functional-SAM (flatlm's combination, not a published method): ε = −ρ m/‖m‖ as
    in MSAM, r(θ) from a clean forward without backward, then one forward–backward at θ + ε for
    J(θ+ε)ᵀ r(θ). Needs ``step(forward=, loss_fn=)``; returns the clean loss."""

    _functional = True


class MomentumPreconditionedFunctionalSAM(MSAM):
    """:class:`MomentumFunctionalSAM` with ε ∝ −P⁻¹m: along the base optimizer's own next update
    direction, P the previous step's √v̂ + eps (flatlm's combination)."""

    _functional = True
    _preconditioned = True


class WSAM(SharpnessAwareOptimizer):
    """WSAM (Yue et al., KDD 2023): ε = ρ g/‖g‖ as SAM, the base optimizer stepped with
    g + γ/(1−γ)·(g_s − g), the gradient of L + γ/(1−γ)·(L(θ+ε) − L(θ)). γ = ½ is SAM.
    The coupled form (the base optimizer sees the weighted gradient); the authors' default
    ``decouple=True`` is not this (docs/algorithms.md)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        gamma: float = 0.9,
        **kw: Any,
    ):
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            direction=EuclideanDirection(),
            gradient_rule=WeightedSharpness(gamma),
            **kw,
        )


class GSAM(SharpnessAwareOptimizer):
    """GSAM (Zhuang et al., ICLR 2022): ε = ρ g/‖g‖ as SAM, the base optimizer stepped with
    g_s − α·g_⊥, g_⊥ the part of the clean g orthogonal to g_s. The paper ties ρ to the LR
    (ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min)): build
    :class:`flatlm.optim.schedules.RhoFollowsLR` (``rho_schedule=lr`` in a spec)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        alpha: float = 0.4,
        **kw: Any,
    ):
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            direction=EuclideanDirection(),
            gradient_rule=SurrogateGap(alpha),
            **kw,
        )


class FriendlySAM(SharpnessAwareOptimizer):
    """FriendlySAM (Li et al., CVPR 2024): ε = ρ d/‖d‖ with d = g − σ·m, m an EMA (momentum
    ``lmbda``) of past clean gradients; the first step is SAM's (m = g)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kw: Any,
    ):
        direction = FriendlyDirection(sigma=sigma, lmbda=lmbda)
        super().__init__(params, base_optimizer, rho=rho, direction=direction, **kw)


class GCSAM(SharpnessAwareOptimizer):
    """GCSAM: SAM with ε = ρ·GC(g)/‖GC(g)‖, GC the gradient centralisation of each tensor with
    two or more dimensions (its rows' means removed)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        **kw: Any,
    ):
        super().__init__(params, base_optimizer, rho=rho, direction=CentralizedDirection(), **kw)


class BSAM(SharpnessAwareOptimizer):
    """bSAM (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023, Algorithm 1)
    over its own base optimizer :class:`~flatlm.optim.bsam.BSAMBase`: the clean pass at the
    noisy point θ + e, e ~ N(0, 1/(N·s)), gives g; ε = ρ·g/s (elementwise, not scaled to length
    ρ); the perturbed pass gives g_ε; θ is copied back; then m ← β₁m + (1 − β₁)(g_ε + δθ),
    s ← β₂s + (1 − β₂)(√s·|g| + δ + γ), θ ← θ − α·m/s.

    ``num_data`` (N, the training examples) is required; ``lr`` (0.5), ``betas``, ``weight_decay``
    δ, ``damping`` γ (0.1), ``s0`` (1) and ``seed`` go to BSAMBase; ρ = 0.01 and α = 0.5 are the
    authors' CIFAR settings. The classic protocols need ``opt.add_noise()`` before the
    caller's clean forward (``step(forward=, loss_fn=)`` does it itself). docs/algorithms.md,
    "bSAM: Bayesian SAM".
    """

    DEFAULT_RHO = 0.01

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = BSAMBase,
        rho: float = DEFAULT_RHO,
        num_data: int | None = None,
        damping: float = 0.1,
        s0: float = 1.0,
        seed: int = 0,
        **kw: Any,
    ):
        base = base_optimizer if isinstance(base_optimizer, type) else type(base_optimizer)
        if isinstance(base_optimizer, type):  # a built BSAMBase has its own
            kw.update(num_data=num_data, damping=damping, s0=s0, seed=seed)
        if not issubclass(base, BSAMBase):
            raise TypeError(
                f"bsam steps with its own base optimizer (flatlm.optim.BSAMBase: its momentum, "
                f"scale s and noise), not {base.__name__}: leave base_optimizer out"
            )
        if kw.get("ascent_steps", 1) != 1:
            raise ValueError("bsam takes one ascent step (ε = ρ·g/s): leave ascent_steps out")
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            direction=PreconditionedDirection("previous", to_radius=False),
            gradient_rule=NoisyScale(),
            noisy_pass=True,
            **kw,
        )
