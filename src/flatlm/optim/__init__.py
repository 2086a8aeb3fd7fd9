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
    "parse_method",
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

_ENGINE_ONLY = ("rho", "max_grad_norm", "perturb_every")


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gasam:alpha=-1,ascent_steps=2"`` -> ``("gasam", {"alpha": -1.0, "ascent_steps": 2})``.

    A method name with optional keyword overrides, so a comparison can name variants of one
    method. Values are read as int, float or bool (true/false) where they parse as such.
    """
    name, _, rest = spec.partition(":")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {name.strip()!r}; choose one of {', '.join(METHODS)}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"bad method option {item!r} in {spec!r}: expected key=value")
        kwargs[k.strip()] = _parse_value(v.strip())
    return key, kwargs


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def create(
    name: str,
    params: Any,
    *,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a method by its short name (see ``METHODS``, ``parse_method``) over ``base_optimizer``.

    ``"adamw"`` gives a plain AdamW; the sharpness-aware options (``rho``, ``max_grad_norm``) are
    then ignored if None and an error otherwise. A None value means "the method's default".
    Options in the name (``"gasam:alpha=-1"``) take precedence over keyword arguments.
    """
    key, overrides = parse_method(name)
    kwargs = {k: v for k, v in {**kwargs, **overrides}.items() if v is not None}
    if key == "adamw":
        extra = sorted(set(kwargs) & {*_ENGINE_ONLY, "alpha", "beta", "ascent_steps", "adaptive"})
        if extra:
            raise ValueError(f"plain AdamW takes no sharpness-aware options, got {extra}")
        return torch.optim.AdamW(params, **kwargs)
    return METHODS[key](params, base_optimizer, **kwargs)
