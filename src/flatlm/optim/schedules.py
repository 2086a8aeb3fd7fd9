"""ρ schedules: set each parameter group's ``rho`` step by step, as torch's LR schedulers set
``lr`` (docs/algorithms.md, "When to spend the second pass").

A schedule multiplies each group's ``initial_rho`` (its ρ when the first schedule was built, kept
in the group like torch's ``initial_lr``) by a factor of the step, so a group at ρ = 0 takes the
engine's plain one-pass step. The factors are pure functions of the step; the classes only apply
them. A ρ scheduler and an LR scheduler on one optimizer each change their own key of the shared
``param_groups`` and are stepped together after ``optimizer.step()``::

    opt = flatlm.optim.SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-3)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    rho_sched = RhoWindow(opt, start=0.0, end=0.25, total_steps=1000)  # SAM in the first 25 %
    for x, y in batches:
        opt.step(forward=..., loss_fn=...)
        lr_sched.step()
        rho_sched.step()

Bounds are fractions of ``total_steps`` in [0, 1] when it is given, step numbers otherwise. A
fraction f covers the steps k with k ≥ f·total, taken as the decimal the user wrote
(``fraction_to_step(0.1, 600) == 60``, not 61 from binary rounding).

The workbench and method specs name a schedule by a string (:func:`parse_rho_schedule`):
``window:START:END``, ``linear:START:END[:FROM:TO]``, ``cosine:START:END[:FROM:TO]``,
``lr[:FROM]`` (ρ follows the learning rate, GSAM's rule: :class:`RhoFollowsLR`) or
``constant``; START and END are fractions, or step numbers written with a trailing ``s``
(``window:0s:60s``). No ``,`` or ``=``, so a schedule fits in a spec:
``"sam:rho=2,rho_schedule=window:0:0.1"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

__all__ = [
    "RHO_SCHEDULES",
    "RhoCosine",
    "RhoFollowsLR",
    "RhoLambda",
    "RhoLinear",
    "RhoSchedule",
    "RhoScheduler",
    "RhoWindow",
    "build_rho_schedule",
    "cosine_factor",
    "fraction_to_step",
    "linear_factor",
    "parse_rho_schedule",
    "window_factor",
]


# ----------------------------------------------------------------------------- the factors


def fraction_to_step(fraction: float, total: int) -> int:
    """The first step k with k ≥ fraction·total, ``fraction`` read as the decimal it prints as."""
    return math.ceil(Fraction(repr(float(fraction))) * total)


def window_factor(step: int, start: int, end: int) -> float:
    """1 on steps start ≤ step < end, 0 elsewhere."""
    return 1.0 if start <= step < end else 0.0


def linear_factor(step: int, start: int, end: int, begin: float = 0.0, final: float = 1.0) -> float:
    """``begin`` up to step ``start``, a straight line to ``final`` at step ``end``, then
    ``final``."""
    if step <= start:
        return begin
    if step >= end:
        return final
    return begin + (final - begin) * (step - start) / (end - start)


def cosine_factor(step: int, start: int, end: int, begin: float = 0.0, final: float = 1.0) -> float:
    """As :func:`linear_factor`, along a half cosine: begin + (final − begin)(1 − cos πt)/2."""
    if step <= start:
        return begin
    if step >= end:
        return final
    t = (step - start) / (end - start)
    return begin + (final - begin) * 0.5 * (1.0 - math.cos(math.pi * t))


def _steps(start: float, end: float, total_steps: int | None) -> tuple[int, int]:
    """Bounds as step numbers: fractions of ``total_steps`` when it is given, else steps."""
    if total_steps is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
        for name, value in (("start", start), ("end", end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{name}={value!r} is a fraction of total_steps and must be in [0, 1]; "
                    "for step numbers leave total_steps out"
                )
        first, last = fraction_to_step(start, total_steps), fraction_to_step(end, total_steps)
    else:
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name}={value!r} must be a step number (a whole number >= 0) without "
                    "total_steps; for fractions of the run give total_steps"
                )
        first, last = int(start), int(end)
    if start >= end:
        raise ValueError(f"start={start!r} must be before end={end!r}")
    return first, last


# ----------------------------------------------------------------------------- the schedulers


class RhoScheduler:
    """Base class: sets ``group["rho"] = group["initial_rho"] * factor(step)`` for every group.

    Like torch's ``LRScheduler``: building it applies step 0's factor; ``step()`` after each
    optimizer step moves to the next; ``last_step`` is the step whose ρ is set now;
    ``state_dict()`` holds everything but the optimizer (and a lambda), so a resumed run sets
    the same ρ at the same step. ``last_step=-1`` records each group's ρ as ``initial_rho``;
    resuming by ``last_step`` needs ``initial_rho`` in every group already.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, last_step: int = -1):
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if "rho" not in group:
                raise ValueError(
                    f"param_groups[{i}] has no 'rho': a ρ schedule needs a sharpness-aware "
                    f"optimizer (got {type(optimizer).__name__})"
                )
            if last_step == -1:
                group.setdefault("initial_rho", group["rho"])
            elif "initial_rho" not in group:
                raise KeyError(
                    f"param_groups[{i}] has no 'initial_rho' to resume from at last_step="
                    f"{last_step}; build the scheduler with last_step=-1"
                )
        self.base_rhos = [group["initial_rho"] for group in optimizer.param_groups]
        self.last_step = last_step
        self.step()

    def factor(self, step: int) -> float:
        """The multiplier of ``initial_rho`` at optimizer step ``step`` (0-based)."""
        raise NotImplementedError

    def step(self) -> None:
        """Move to the next optimizer step and set its ρ."""
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_rhos, strict=True):
            group["rho"] = base * factor

    def get_last_rho(self) -> list[float]:
        """Each group's ρ as this scheduler last set it."""
        return [group["rho"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer" and not callable(v)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (and the bounds it was saved with) and set that step's ρ."""
        self.__dict__.update(state_dict)
        self._apply()


class RhoLambda(RhoScheduler):
    """ρ = initial_rho · ``fn(step)``; compose factors by multiplying them inside ``fn``
    (``lambda k: window_factor(k, 0, 100) * cosine_factor(k, 0, 100, 1, 0)``). The function is
    not saved in ``state_dict`` (as in torch's ``LambdaLR``): pass the same one on resume."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, fn: Callable[[int], float], last_step: int = -1
    ):
        self.fn = fn
        super().__init__(optimizer, last_step)

    def factor(self, step: int) -> float:
        return float(self.fn(step))


class RhoWindow(RhoScheduler):
    """ρ = initial_rho on steps in [start, end), 0 outside (fractions of ``total_steps`` when it
    is given, else step numbers)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        start: float,
        end: float,
        total_steps: int | None = None,
        last_step: int = -1,
    ):
        self.start_step, self.end_step = _steps(start, end, total_steps)
        super().__init__(optimizer, last_step)

    def factor(self, step: int) -> float:
        return window_factor(step, self.start_step, self.end_step)


class RhoLinear(RhoScheduler):
    """The factor goes from ``begin`` at ``start`` to ``final`` at ``end`` in a straight line
    (warm-up with the defaults 0 → 1; a decay with begin=1, final=0)."""

    shape = staticmethod(linear_factor)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        start: float,
        end: float,
        total_steps: int | None = None,
        begin: float = 0.0,
        final: float = 1.0,
        last_step: int = -1,
    ):
        for name, value in (("begin", begin), ("final", final)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite factor >= 0")
        self.start_step, self.end_step = _steps(start, end, total_steps)
        self.begin, self.final = float(begin), float(final)
        super().__init__(optimizer, last_step)

    def factor(self, step: int) -> float:
        return self.shape(step, self.start_step, self.end_step, self.begin, self.final)


class RhoCosine(RhoLinear):
    """As :class:`RhoLinear`, along a half cosine."""

    shape = staticmethod(cosine_factor)


class RhoFollowsLR(RhoScheduler):
    """ρ tied to the learning rate, GSAM's rule (Zhuang et al. 2022, their ``ProportionScheduler``):
    per group, ρ_t = ρ_min + (ρ_max − ρ_min)·(lr_t − lr_min)/(lr_max − lr_min) with ρ_max the
    group's ``initial_rho``, ρ_min = ``begin``·ρ_max, lr_max the group's ``initial_lr`` (set by
    torch's LR schedulers; else its LR when this is built) and lr_min = ``lr_min``.

    It reads ``group["lr"]`` when it steps: step the LR scheduler first (as the workbench and
    the module's example do), so ρ_t and lr_t belong to the same step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        begin: float = 0.0,
        lr_min: float = 0.0,
        last_step: int = -1,
    ):
        if not (math.isfinite(begin) and 0.0 <= begin <= 1.0):
            raise ValueError(f"begin={begin!r} (ρ_min as a fraction of ρ) must be in [0, 1]")
        self.begin, self.lr_min = float(begin), float(lr_min)
        self.max_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for lr_max in self.max_lrs:
            if not lr_max > self.lr_min:
                raise ValueError(
                    f"lr_min={lr_min!r} must be below every group's initial LR ({lr_max!r})"
                )
        super().__init__(optimizer, last_step)

    def _apply(self) -> None:
        groups = self.optimizer.param_groups
        for group, base, lr_max in zip(groups, self.base_rhos, self.max_lrs, strict=True):
            low = self.begin * base
            group["rho"] = low + (base - low) * (group["lr"] - self.lr_min) / (lr_max - self.lr_min)


# ----------------------------------------------------------------------------- by name


#: The schedules a string can name, and the class each builds (``constant``: none).
RHO_SCHEDULES: dict[str, type[RhoScheduler] | None] = {
    "constant": None,
    "window": RhoWindow,
    "linear": RhoLinear,
    "cosine": RhoCosine,
    "lr": RhoFollowsLR,
}


@dataclass(frozen=True)
class RhoSchedule:
    """A parsed schedule string: the name, its bounds, whether they are step numbers, and the
    ramps' end factors."""

    name: str
    start: float = 0.0
    end: float = 1.0
    in_steps: bool = False
    begin: float = 0.0
    final: float = 1.0


def _bound(text: str, spec: str) -> tuple[float, bool]:
    in_steps = text.endswith("s")
    number = text[:-1] if in_steps else text
    try:
        value = int(number) if in_steps else float(number)
    except ValueError:
        want = "a step number like 60s" if in_steps else "a fraction like 0.25 or a step like 60s"
        raise ValueError(f"bad bound {text!r} in ρ schedule {spec!r}: expected {want}") from None
    if not in_steps and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"bound {text!r} in ρ schedule {spec!r} is a fraction of training and must be in "
            "[0, 1]; write step numbers with a trailing s (60s)"
        )
    if in_steps and value < 0:
        raise ValueError(f"bound {text!r} in ρ schedule {spec!r} must be a step number >= 0")
    return value, in_steps


def parse_rho_schedule(spec: str) -> RhoSchedule:
    """``"window:0:0.1"`` -> ``RhoSchedule("window", 0.0, 0.1)``; a ValueError naming the problem
    for an unknown name, a missing or extra field, a bound outside [0, 1], or start ≥ end."""
    name, *fields = [part.strip() for part in spec.strip().split(":")]
    forms = (
        "window:START:END, linear:START:END[:FROM:TO], cosine:START:END[:FROM:TO], lr[:FROM], "
        "constant"
    )
    if name not in RHO_SCHEDULES:
        raise ValueError(f"unknown ρ schedule {name!r} in {spec!r}; choose one of: {forms}")
    if name == "lr":
        if len(fields) > 1:
            raise ValueError(f"ρ schedule {spec!r} has {len(fields)} fields; the form is lr[:FROM]")
        try:
            begin = float(fields[0]) if fields else 0.0
        except ValueError:
            raise ValueError(f"ρ schedule {spec!r}: FROM must be a number") from None
        if not (math.isfinite(begin) and 0.0 <= begin <= 1.0):
            raise ValueError(f"ρ schedule {spec!r}: FROM (ρ_min / ρ) must be in [0, 1]")
        return RhoSchedule(name, begin=begin)
    if name == "constant":
        if fields:
            raise ValueError(f"ρ schedule 'constant' takes no bounds, got {spec!r}")
        return RhoSchedule(name)
    allowed = (2,) if name == "window" else (2, 4)
    if len(fields) not in allowed:
        raise ValueError(f"ρ schedule {spec!r} has {len(fields)} fields; the forms are: {forms}")
    (start, start_steps), (end, end_steps) = (_bound(f, spec) for f in fields[:2])
    if start_steps != end_steps:
        raise ValueError(
            f"ρ schedule {spec!r} mixes a fraction and a step number; write both as fractions "
            "(0.1) or both as steps (60s)"
        )
    if start >= end:
        raise ValueError(f"ρ schedule {spec!r}: start {fields[0]} must be before end {fields[1]}")
    begin, final = 0.0, 1.0
    if len(fields) == 4:
        try:
            begin, final = float(fields[2]), float(fields[3])
        except ValueError:
            raise ValueError(f"ρ schedule {spec!r}: FROM and TO must be numbers") from None
        if not all(math.isfinite(v) and v >= 0 for v in (begin, final)):
            raise ValueError(f"ρ schedule {spec!r}: FROM and TO must be finite factors >= 0")
    return RhoSchedule(name, start, end, start_steps, begin, final)


def build_rho_schedule(
    optimizer: torch.optim.Optimizer, spec: str | RhoSchedule, total_steps: int
) -> RhoScheduler | None:
    """The scheduler a schedule string names over a run of ``total_steps`` (None: constant)."""
    schedule = parse_rho_schedule(spec) if isinstance(spec, str) else spec
    cls = RHO_SCHEDULES[schedule.name]
    if cls is None:
        return None
    total = None if schedule.in_steps else total_steps
    start, end = (
        (int(schedule.start), int(schedule.end))
        if schedule.in_steps
        else (schedule.start, schedule.end)
    )
    if cls is RhoFollowsLR:
        return RhoFollowsLR(optimizer, begin=schedule.begin)
    if cls is RhoWindow:
        return RhoWindow(optimizer, start, end, total)
    assert issubclass(cls, RhoLinear)
    return cls(optimizer, start, end, total, begin=schedule.begin, final=schedule.final)
