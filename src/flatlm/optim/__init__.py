"""Sharpness-aware optimizers on one perturbation engine.

>>> opt = flatlm.optim.FunctionalSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
>>> loss = opt.step(forward=lambda: model(x), loss_fn=lambda logits: F.cross_entropy(...))

Layout (docs/architecture.md): ``registry`` (methods by name), ``methods`` (the classes),
``engine`` (the optimizer), ``policies`` (which steps are fresh, reuse or plain),
``passes`` (clean and perturbed passes), ``perturbation`` (θ → θ+ε
and back), ``directions`` (pure direction rules), ``preconditioners`` (what rules read from the
base optimizer), ``amp`` (fp16 scaling across two passes).
"""

from __future__ import annotations

from flatlm.optim.bsam import BSAMBase
from flatlm.optim.directions import (
    AdaptiveDirection,
    EuclideanDirection,
    GradientStrengthDirection,
    MomentumDirection,
    PreconditionedDirection,
)
from flatlm.optim.engine import NonFiniteStepWarning, SharpnessAwareOptimizer
from flatlm.optim.methods import (
    ASAM,
    BSAM,
    GASAM,
    GCSAM,
    GSAM,
    MSAM,
    SAM,
    WSAM,
    FriendlySAM,
    FunctionalSAM,
    MomentumFunctionalSAM,
    MomentumPreconditionedFunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
)
from flatlm.optim.policies import (
    AESAM,
    EveryStep,
    Interval,
    LookSAM,
    RandomSwitch,
    ReuseDirection,
    StepPolicy,
)
from flatlm.optim.preconditioners import register_momentum, register_preconditioner
from flatlm.optim.registry import METHODS, create, default_rho, parse_method
from flatlm.optim.sharded import gradient_sync

__all__ = [
    "AESAM",
    "ASAM",
    "BSAM",
    "GASAM",
    "GCSAM",
    "GSAM",
    "METHODS",
    "MSAM",
    "SAM",
    "WSAM",
    "AdaptiveDirection",
    "BSAMBase",
    "EuclideanDirection",
    "EveryStep",
    "FriendlySAM",
    "FunctionalSAM",
    "GradientStrengthDirection",
    "Interval",
    "LookSAM",
    "MomentumDirection",
    "MomentumFunctionalSAM",
    "MomentumPreconditionedFunctionalSAM",
    "NonFiniteStepWarning",
    "PreconditionedDirection",
    "PreconditionedFunctionalSAM",
    "PreconditionedSAM",
    "RandomSwitch",
    "ReuseDirection",
    "SharpnessAwareOptimizer",
    "StepPolicy",
    "create",
    "default_rho",
    "gradient_sync",
    "parse_method",
    "register_momentum",
    "register_preconditioner",
]
