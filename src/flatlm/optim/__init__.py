"""Sharpness-aware optimizers on one perturbation engine.

>>> opt = flatlm.optim.FunctionalSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
>>> loss = opt.step(forward=lambda: model(x), loss_fn=lambda logits: F.cross_entropy(...))
"""

from __future__ import annotations

from typing import Any

import torch

from flatlm.optim.directions import (
    AdaptiveDirection,
    EuclideanDirection,
    GradientStrengthDirection,
    PreconditionedDirection,
    register_preconditioner,
)
from flatlm.optim.engine import NonFiniteStepWarning, SharpnessAwareOptimizer
from flatlm.optim.methods import (
    GASAM,
    SAM,
    FunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
)

__all__ = [
    "GASAM",
    "METHODS",
    "SAM",
    "AdaptiveDirection",
    "EuclideanDirection",
    "FunctionalSAM",
    "GradientStrengthDirection",
    "NonFiniteStepWarning",
    "PreconditionedDirection",
    "PreconditionedFunctionalSAM",
    "PreconditionedSAM",
    "SharpnessAwareOptimizer",
    "create",
    "register_preconditioner",
]

#: Short names used by the CLI, configs and the Hugging Face integration.
METHODS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sam": SAM,
    "fsam": FunctionalSAM,
    "psam": PreconditionedSAM,
    "pfsam": PreconditionedFunctionalSAM,
    "gasam": GASAM,
}

_ENGINE_ONLY = ("rho", "max_grad_norm")


def create(
    name: str,
    params: Any,
    *,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a method by its short name (see ``METHODS``) over ``base_optimizer``.

    ``"adamw"`` gives a plain AdamW; the sharpness-aware options (``rho``, ``max_grad_norm``) are
    then ignored if None and an error otherwise. A None value means "the method's default".
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if key == "adamw":
        extra = sorted(set(kwargs) & {*_ENGINE_ONLY, "alpha", "beta", "ascent_steps", "adaptive"})
        if extra:
            raise ValueError(f"plain AdamW takes no sharpness-aware options, got {extra}")
        return torch.optim.AdamW(params, **kwargs)
    return METHODS[key](params, base_optimizer, **kwargs)
