"""Argument checks shared by the engine and the perturbation (each check once)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["check_group_rhos", "check_options", "check_rho", "check_state_dict"]


def check_rho(rho: object) -> None:
    if (
        isinstance(rho, bool)
        or not isinstance(rho, (int, float))
        or not math.isfinite(rho)
        or rho < 0
    ):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def check_group_rhos(groups: list[dict[str, Any]]) -> None:
    for i, g in enumerate(groups):
        try:
            check_rho(g["rho"])
        except ValueError as e:
            raise ValueError(f"param_groups[{i}]: {e}") from None


def check_options(
    base_optimizer: Any,
    rho: float,
    functional: bool,
    ascent_steps: int,
    max_grad_norm: float | None,
    perturb_every: int,
    distributed: str,
) -> None:
    check_rho(rho)
    if distributed not in ("sync", "local"):
        raise ValueError(f"distributed must be 'sync' or 'local', got {distributed!r}")
    if isinstance(base_optimizer, torch.optim.Optimizer):
        raise TypeError(
            "base_optimizer must be an optimizer class such as torch.optim.AdamW, with its "
            f"arguments as keywords; got an instance of {type(base_optimizer).__name__}"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            "base_optimizer must be a subclass of torch.optim.Optimizer (e.g. "
            f"torch.optim.AdamW), got {base_optimizer!r}"
        )
    if not isinstance(ascent_steps, int) or ascent_steps < 1:
        raise ValueError(f"ascent_steps must be an integer >= 1, got {ascent_steps!r}")
    if functional and ascent_steps > 1:
        raise ValueError("the functional methods take a single ascent step")
    if isinstance(perturb_every, bool) or not isinstance(perturb_every, int) or perturb_every < 1:
        raise ValueError(f"perturb_every must be an integer >= 1, got {perturb_every!r}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")


def check_state_dict(state_dict: Any, method: str) -> None:
    """A flatlm state dict for ``method``, else a ValueError saying what it is instead."""
    if not isinstance(state_dict, dict) or not {"base", "method_state"} <= set(state_dict):
        raise ValueError(
            f"not a {method} state dict: expected keys 'base' and 'method_state'"
            + (
                f", got {sorted(state_dict)[:8]}"
                if isinstance(state_dict, dict)
                else f", got {type(state_dict).__name__}"
            )
        )
    saved = state_dict.get("flatlm_method")
    if saved is not None and saved != method:
        raise ValueError(f"state dict is for {saved}, cannot load it into {method}")
