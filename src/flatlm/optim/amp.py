"""fp16 loss scaling across two passes: unscale, overflow flags, the on-device skip.

``torch.amp.GradScaler.unscale_`` may run once per optimizer and update, but a sharpness-aware
step has two sets of scaled gradients. The clean ones are unscaled here by hand with the same
kernel and scale; the perturbed ones go through ``scaler.unscale_`` with the clean pass's
overflow folded in, so the scaler records either and backs off at ``update()``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NonFiniteStepWarning",
    "SkipCount",
    "by_device",
    "can_skip_on_device",
    "inverse_scale",
    "poison_if",
    "record_unscaled",
    "scaled_backward",
    "step_or_skip",
    "step_or_skip_on_device",
    "unscale_clean_",
    "unscale_clean_pass_",
    "unscale_grads_",
    "unscale_perturbed_",
    "warn_skipped",
]


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    groups: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def unscale_grads_(grads: list[Tensor], inv_scale: Tensor) -> Tensor:
    """Gradients × inv_scale in place (as GradScaler unscales, per device, no host sync); returns a
    1-element flag, > 0 if any gradient was non-finite."""
    found = torch.zeros(1, device=inv_scale.device)
    for device, device_grads in by_device(grads).items():
        flag = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(device_grads, flag, inv_scale.to(device))
        found += flag.to(found.device)
    return found


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """1/scale as GradScaler computes it (in float64, then float32), on the scale's device."""
    return scaler._scale.double().reciprocal().float()  # type: ignore[union-attr]


def poison_if(grads: list[Tensor], flag: Tensor) -> None:
    """Gradients × NaN where ``flag`` > 0 (× 1 otherwise, which is exact): folds an overflow seen
    elsewhere into these gradients, on the device."""
    if not grads:
        return
    poison = torch.where(flag.sum() > 0, float("nan"), 1.0)
    for device, device_grads in by_device(grads).items():
        torch._foreach_mul_(device_grads, poison.to(device))


def scaled_backward(loss: Tensor, weight: float, scaler: torch.amp.GradScaler | None) -> None:
    """Backward of ``weight · loss``, scaled by ``scaler`` when there is one."""
    if weight != 1.0:
        loss = loss * weight
    if scaler is not None:
        loss = scaler.scale(loss)
    loss.backward()


def can_skip_on_device(base: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> bool:
    """Fused Adam/AdamW/SGD leave params and moments untouched (and undo the step count) when
    ``found_inf`` is set: a non-finite step can then be skipped with no host sync."""
    return getattr(base, "_step_supports_amp_scaling", False) and all(
        g.get("fused", False) for g in groups
    )


def unscale_clean_(grads: list[Tensor], scaler: torch.amp.GradScaler) -> Tensor:
    """Unscale the clean pass's gradients in place; returns its found-inf flag (no host sync).

    By hand, not with ``scaler.unscale_``: that one call per update is kept for the perturbed
    gradients, so "unscale twice" never happens.
    """
    return unscale_grads_(grads, inverse_scale(scaler))


def unscale_clean_pass_(
    scaler: torch.amp.GradScaler | None, grads: list[Tensor], one_pass: bool, device: torch.device
) -> Tensor | None:
    """:func:`unscale_clean_` for a step's clean pass (None: no scaler). One pass: no parameter
    has a clean gradient to unscale (a fresh or just-loaded scaler has no scale yet), the flag
    is clear; a non-finite scaled r shows up in the perturbed gradients instead."""
    if scaler is None:
        return None
    return torch.zeros(1, device=device) if one_pass else unscale_clean_(grads, scaler)


def unscale_perturbed_(
    optimizer: torch.optim.Optimizer,
    grads: list[Tensor],
    scaler: torch.amp.GradScaler,
    clean_overflow: Tensor,
) -> None:
    """``scaler.unscale_(optimizer)`` on the perturbed gradients, seeing the clean pass's
    overflow too: it is folded in as NaN gradients, so the scaler records it, backs off at
    ``update()``, and the step is skipped."""
    poison_if(grads, clean_overflow)
    scaler.unscale_(optimizer)


def record_unscaled(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, found_inf: Tensor
) -> None:
    """Tell ``scaler`` that ``optimizer``'s gradients are unscaled (by :func:`unscale_clean_`)
    with overflow flag ``found_inf``, as ``scaler.unscale_`` records it, so ``update()`` backs
    off on an overflow: a step with one pass has no perturbed gradients to hand to
    ``unscale_``, and unscaling twice would divide twice."""
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is not OptState.READY:
        raise RuntimeError("the scaler already unscaled this optimizer's gradients this step")
    assert scaler._scale is not None
    flag = found_inf.reshape(()).to(device=scaler._scale.device, dtype=torch.float32)
    state["found_inf_per_device"] = {scaler._scale.device: flag}
    state["stage"] = OptState.UNSCALED


def step_or_skip_on_device(base: torch.optim.Optimizer, ok: Tensor) -> Tensor:
    """Step a fused base optimizer, which itself skips (no host sync) where ``ok`` is False;
    returns the skip as a float flag (1.0: skipped), on the device."""
    not_ok = (~ok).to(torch.float32)
    base.found_inf = not_ok  # type: ignore[attr-defined]
    try:
        base.step()
    finally:
        del base.found_inf  # type: ignore[attr-defined]
    return not_ok


class NonFiniteStepWarning(RuntimeWarning):
    """A step was skipped because a pass gave a non-finite loss or gradient."""


def warn_skipped(optimizer_name: str, skipped_steps: int) -> None:
    """Warn that a step was skipped (pointing at the caller of the optimizer's ``step``)."""
    warnings.warn(
        f"{optimizer_name}: non-finite loss or gradient, step skipped "
        f"(parameters and optimizer state unchanged; {skipped_steps} skipped so far)",
        NonFiniteStepWarning,
        stacklevel=6,
    )


@dataclass
class SkipCount:
    """Skipped steps: counted on the host, or as a device tensor when the skip is decided on the
    device (read only when asked for, so a step needs no sync)."""

    host: int = 0
    device: Tensor | None = None

    def add_on_device(self, not_ok: Tensor) -> None:
        self.device = not_ok if self.device is None else self.device + not_ok

    def total(self) -> int:
        return self.host + (0 if self.device is None else int(self.device.item()))


def step_or_skip(
    base: torch.optim.Optimizer,
    ok: Tensor,
    skips: SkipCount,
    *,
    skip_nonfinite: bool,
    on_device: bool,
) -> bool | None:
    """Step ``base``, or skip the step where ``ok`` is False (counted in ``skips``). Returns
    whether it stepped: True or False (one host read of ``ok``), or None when the fused base
    optimizer decided on the device (no sync)."""
    if not skip_nonfinite:
        base.step()
        return True
    if on_device:
        skips.add_on_device(step_or_skip_on_device(base, ok))
        return None
    taken = bool(ok)  # the one host read of a step: was everything finite?
    if taken:
        base.step()
    else:
        skips.host += 1
    return taken
