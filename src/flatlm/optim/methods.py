"""The public methods: each is the engine with one direction rule and one gradient rule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.directions import (
    AdaptiveDirection,
    EuclideanDirection,
    GradientStrengthDirection,
    PreconditionedDirection,
)
from flatlm.optim.engine import SharpnessAwareOptimizer

__all__ = ["GASAM", "SAM", "FunctionalSAM", "PreconditionedFunctionalSAM", "PreconditionedSAM"]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]
AdamW = torch.optim.AdamW


class SAM(SharpnessAwareOptimizer):
    """SAM (Foret et al. 2021): ε = ρ g/‖g‖, descent with ∇L(θ+ε).

    ``adaptive=True`` is ASAM (Kwon et al. 2021): ε = ρ T²g/‖Tg‖ with T = |θ| + eta.
    Engine options (``max_grad_norm``, ``replay_rng``, ``skip_nonfinite``) pass through ``**kw``;
    everything else in ``**kw`` goes to ``base_optimizer``.
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
    """SAM with ε = ρ P⁻¹g/‖P⁻¹g‖, P = √v̂ + eps from the base Adam/AdamW state (I until it exists)."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        **kw: Any,
    ):
        super().__init__(params, base_optimizer, rho=rho, direction=PreconditionedDirection(), **kw)


class PreconditionedFunctionalSAM(SharpnessAwareOptimizer):
    """Functional-SAM's gradient rule with Preconditioned SAM's direction."""

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        **kw: Any,
    ):
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            direction=PreconditionedDirection(),
            functional=True,
            **kw,
        )


class GASAM(SharpnessAwareOptimizer):
    """GA-SAM, in flatlm's formulation of its principle (not a line-by-line reproduction).

    The corruption set is the ellipsoid ‖ε ⊘ D‖ ≤ ρ with D = (ŝ + ξ)^α, ŝ the bias-corrected
    RMS of each element's gradient over time (EMA ``beta``), relative to its RMS over all elements
    when ``normalize``. One step: ε = ρ D²g/‖Dg‖; ``ascent_steps=K`` takes K projected steps of
    size ρ/K. α = 0 is SAM. D is clamped to [1/max_scale, max_scale] so no α gives a
    non-finite step. The default α = −1 (shrink the corruption where gradients are strong) won
    flatlm's LSTM and GPT comparisons against α ∈ {0.5, 1} (docs/results.md); note that ρ bounds
    the ellipsoid norm, so the Euclidean ‖ε‖ can exceed ρ (up to ρ·max_scale).
    See docs/algorithms.md.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = AdamW,
        rho: float = 0.05,
        alpha: float = -1.0,
        beta: float = 0.99,
        normalize: bool = True,
        ascent_steps: int = 1,
        xi: float = 1e-12,
        max_scale: float = 100.0,
        **kw: Any,
    ):
        direction = GradientStrengthDirection(
            alpha=alpha, beta=beta, normalize=normalize, xi=xi, max_scale=max_scale
        )
        super().__init__(
            params, base_optimizer, rho=rho, direction=direction, ascent_steps=ascent_steps, **kw
        )
