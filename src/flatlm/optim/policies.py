"""Step policies: which steps pay for a fresh perturbation (docs/algorithms.md, "Step policies").

Every step is one of three kinds:

- ``FRESH``: the clean pass at θ, ε from g, the second pass at θ + ε (two gradient passes);
- ``REUSE``: one gradient pass that reuses what the last fresh step stored: ``perturb_every``'s
  stored direction (the one pass is at θ + ρ·δ, no clean backward) or LookSAM's correction (the
  clean pass, then the update direction g + α‖g‖/‖g_v‖·g_v);
- ``PLAIN``: the base optimizer's own step on the clean gradient (one pass).

A policy decides the kind on the host, before the step (``plan``) or, for AE-SAM, from the clean
gradient's squared norm (``plan`` returns ``DECIDE``, then ``decide``). It is pure Python on host
numbers: no tensor, no device sync of its own, its whole state in :meth:`StepPolicy.state_dict`.
The per-parameter tensors a policy stores (``stored``) live in the optimizer's ``state``, so
checkpoints, FSDP2 and ``torch.distributed.checkpoint`` treat them like Adam's moments.

A step whose ρ is 0 in every group is ``PLAIN`` whatever the policy says (the engine's rule),
and still counts as a step of the policy's clock ``t``.

LookSAM's gradient maths (g_v, the correction) are in :mod:`~flatlm.optim.combination`, beside
the gradient rules of WSAM and GSAM (a method's ``gradient_rule``, not a policy), which combine
a fresh step's clean g and perturbed g_s.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any, ClassVar

from flatlm.optim.state_layout import KINDS, Scalars, policy_name

__all__ = [
    "AESAM",
    "DECIDE",
    "FRESH",
    "KINDS",
    "PLAIN",
    "POLICIES",
    "REUSE",
    "SPEC_DEFAULTS",
    "EveryStep",
    "Interval",
    "LookSAM",
    "RandomSwitch",
    "ReuseDirection",
    "StepBook",
    "StepPolicy",
    "make_policy",
]

FRESH, REUSE, PLAIN = KINDS
#: ``plan``'s answer when the kind depends on this step's clean gradient (AE-SAM).
DECIDE = "decide"


def _fraction(t: int, total: int | None) -> float:
    """t/T clamped to [0, 1] (0 when no T is given: the schedule then stays at its start)."""
    return 0.0 if not total else min(max(t / total, 0.0), 1.0)


class StepPolicy:
    """A fresh step every step (SAM as published); the base of every policy.

    ``t`` counts the steps taken with this policy (every kind, skipped ones included), so a
    policy's clock is the optimizer's step count.
    """

    name: ClassVar[str] = "every_step"
    #: What a REUSE step reuses: ``"direction"`` (no clean backward) or ``"correction"``.
    reuses: ClassVar[str | None] = None
    #: The per-parameter tensor a fresh step stores in the optimizer's state (None: none).
    stored: ClassVar[str | None] = None
    #: A fresh step needs the clean gradient again after the perturbed pass.
    keeps_clean_gradient: ClassVar[bool] = False
    #: ``perturb_every``'s steps since the last fresh perturbation (state_layout's scalar).
    since_fresh: int | None = None

    def __init__(self) -> None:
        self.t = 0

    def plan(self) -> str:
        """This step's kind, or ``DECIDE`` (then :meth:`decide` with the clean gradient)."""
        return FRESH

    def decide(self, grad_sq_norm: float) -> str:
        raise NotImplementedError(f"{self.name} decides before the step")

    def advance(self, kind: str, taken: bool | None) -> None:
        """After a step of ``kind``; ``taken`` False: skipped (non-finite), None: not known on
        the host (a skip on the device)."""
        self.t += 1

    @property
    def every_step(self) -> bool:
        """Every step fresh: the protocols that run the clean pass themselves can host it."""
        return type(self) is EveryStep

    def options(self) -> dict[str, Any]:
        """The constructor's arguments (for ``repr`` and checkpoints' name check)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"the checkpoint's step policy is {state.get('name')!r}, this optimizer's "
                f"{self.name!r}: build the optimizer with the policy it was saved with"
            )
        self.t = int(state["t"])

    def dumps(self) -> str:
        """:meth:`state_dict` as JSON (exact for floats: Python writes the shortest repr)."""
        return json.dumps(self.state_dict(), sort_keys=True)

    def loads(self, text: str) -> None:
        self.load_state_dict(json.loads(text))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"


class EveryStep(StepPolicy):
    """SAM as published: every step fresh."""


class ReuseDirection(StepPolicy):
    """``perturb_every=k``, flatlm's own rule (neither LookSAM nor composer's ``interval``): a
    fresh ε every k-th step storing δ = ε/ρ; the steps in between one pass at θ + ρ_t·δ.

    ``since_fresh``: steps since the last fresh ε was taken (None: one is due). A skipped fresh
    step leaves no direction worth reusing; a plain step (ρ = 0) ages the stored one.
    """

    name = "reuse_direction"
    reuses = "direction"
    stored = "perturb_direction"

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.since_fresh: int | None = None

    def plan(self) -> str:
        due = self.since_fresh is None or self.since_fresh >= self.every
        return FRESH if due else REUSE

    def advance(self, kind: str, taken: bool | None) -> None:
        super().advance(kind, taken)
        if kind == FRESH:
            self.since_fresh = None if taken is False else 1
        elif self.since_fresh is not None:
            self.since_fresh += 1

    def options(self) -> dict[str, Any]:
        return {"every": self.every}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "since_fresh": self.since_fresh}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        since = state.get("since_fresh")
        self.since_fresh = None if since is None else int(since)


class Interval(StepPolicy):
    """composer's ``SAM(interval=k)``: fresh when (t + 1) % k == 0, the base step otherwise."""

    name = "interval"

    def __init__(self, every: int):
        super().__init__()
        self.every = every

    def plan(self) -> str:
        return FRESH if (self.t + 1) % self.every == 0 else PLAIN

    def options(self) -> dict[str, Any]:
        return {"every": self.every}


class LookSAM(StepPolicy):
    """LookSAM (Liu et al., CVPR 2022): a SAM step every k-th step (t % k == 0, t from 0) that
    stores g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g, the part of the SAM gradient orthogonal to the clean
    one; in between one clean pass and the update direction g + α·(‖g‖/‖g_v‖)·g_v. Norms and
    inner products are global (over every parameter of every group), as the paper's LookSAM
    (its layer-wise variant, Look-LayerSAM, is not this). A step due to reuse with no g_v stored
    (the last fresh step was skipped, or plain at ρ = 0) is fresh instead.
    """

    name = "looksam"
    reuses = "correction"
    stored = "looksam_gv"
    keeps_clean_gradient = True

    def __init__(self, every: int, alpha: float = 0.7):
        super().__init__()
        self.every = every
        self.alpha = alpha
        self.has_stored = False

    def plan(self) -> str:
        return FRESH if self.t % self.every == 0 or not self.has_stored else REUSE

    def advance(self, kind: str, taken: bool | None) -> None:
        super().advance(kind, taken)
        if kind == FRESH:
            self.has_stored = taken is not False

    def options(self) -> dict[str, Any]:
        return {"every": self.every, "alpha": self.alpha}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "has_stored": self.has_stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.has_stored = bool(state["has_stored"])


class AESAM(StepPolicy):
    """AE-SAM (Jiang et al., ICLR 2023): running mean μ and variance σ² of ‖g‖² (EMA with δ),
    updated with this step's clean ‖g‖² before the test; fresh if ‖g‖² ≥ μ + c_t·σ, plain
    otherwise (on the clean gradient already computed: one pass). c_t moves linearly from
    ``c_start`` at t = 0 to ``c_end`` at t = ``total_steps`` (the paper's λ₂ = 1 → λ₁ = −1, so
    SAM is rarer early and commoner late). μ and σ² start at 0. A non-finite ‖g‖² (a step that
    will be skipped) is plain and leaves μ, σ² unchanged. The defaults δ = 0.9, λ₂ = 1, λ₁ = −1
    are unverified against the paper's text (docs/algorithms.md, "Step policies").
    """

    name = "aesam"

    def __init__(
        self,
        delta: float = 0.9,
        c_start: float = 1.0,
        c_end: float = -1.0,
        total_steps: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"aesam_delta must be in [0, 1), got {delta!r}")
        if c_start != c_end and not total_steps:
            raise ValueError(
                "AE-SAM's threshold c_t moves from aesam_c_start to aesam_c_end over training: "
                "pass total_steps=<the run's number of steps> (or equal c_start and c_end for a "
                "constant threshold)"
            )
        self.delta, self.c_start, self.c_end = delta, c_start, c_end
        self.total_steps = total_steps
        self.mean = 0.0
        self.var = 0.0

    def plan(self) -> str:
        return DECIDE

    def threshold(self) -> float:
        return self.c_start + (self.c_end - self.c_start) * _fraction(self.t, self.total_steps)

    def decide(self, grad_sq_norm: float) -> str:
        if not math.isfinite(grad_sq_norm):
            return PLAIN
        d = self.delta
        self.mean = d * self.mean + (1.0 - d) * grad_sq_norm
        self.var = d * self.var + (1.0 - d) * (grad_sq_norm - self.mean) ** 2
        return (
            FRESH if grad_sq_norm >= self.mean + self.threshold() * math.sqrt(self.var) else PLAIN
        )

    def options(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "c_start": self.c_start,
            "c_end": self.c_end,
            "total_steps": self.total_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var = float(state["mean"]), float(state["var"])


class RandomSwitch(StepPolicy):
    """Randomised switching (RST, Zhao et al. 2022): fresh with probability p_t, plain
    otherwise. p_t = ``p`` constant, or linear from ``p`` at t = 0 to ``p_end`` at
    ``total_steps``. Step t's draw is u_t = Random(f"{seed}:{t}").random() (Python's Mersenne
    Twister seeded from the string): deterministic under the seed, the same on every rank, its
    whole generator state (seed, t) in ``state_dict``, and torch's global RNG never touched.
    """

    name = "rst"

    def __init__(
        self,
        p: float = 0.5,
        p_end: float | None = None,
        total_steps: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for value in (p, p_end):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"rst_p and rst_p_end must be in [0, 1], got {value!r}")
        if p_end is not None and p_end != p and not total_steps:
            raise ValueError(
                "rst_p_end moves the probability over training: pass total_steps=<the run's "
                "number of steps>"
            )
        self.p, self.p_end, self.total_steps, self.seed = p, p_end, total_steps, seed

    def probability(self) -> float:
        if self.p_end is None:
            return self.p
        return self.p + (self.p_end - self.p) * _fraction(self.t, self.total_steps)

    def draw(self) -> float:
        return random.Random(f"{self.seed}:{self.t}").random()

    def plan(self) -> str:
        return FRESH if self.draw() < self.probability() else PLAIN

    def options(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "p_end": self.p_end,
            "total_steps": self.total_steps,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = int(state["seed"])


POLICIES: dict[str, type[StepPolicy]] = {
    cls.name: cls for cls in (EveryStep, ReuseDirection, Interval, LookSAM, AESAM, RandomSwitch)
}

#: The method-spec options that build a policy (``sam:policy=looksam,every=5``), with types.
SPEC_OPTIONS: dict[str, type] = {
    "policy": str,
    "every": int,
    "looksam_alpha": float,
    "aesam_delta": float,
    "aesam_c_start": float,
    "aesam_c_end": float,
    "rst_p": float,
    "rst_p_end": float,
    "policy_seed": int,
    "total_steps": int,
}
#: The spec options' defaults, one place for :func:`make_policy` and ``flatlm methods``
#: (None: none; ``every`` is required by the policies that use it, ``total_steps`` by a
#: threshold or probability that moves over training).
SPEC_DEFAULTS: dict[str, Any] = {
    "policy": "every_step",
    "every": None,
    "looksam_alpha": 0.7,
    "aesam_delta": 0.9,
    "aesam_c_start": 1.0,
    "aesam_c_end": -1.0,
    "rst_p": 0.5,
    "rst_p_end": None,
    "policy_seed": 0,
    "total_steps": None,
}
_USES = {
    "every_step": set(),
    "reuse_direction": {"every"},
    "interval": {"every"},
    "looksam": {"every", "looksam_alpha"},
    "aesam": {"aesam_delta", "aesam_c_start", "aesam_c_end", "total_steps"},
    "rst": {"rst_p", "rst_p_end", "total_steps", "policy_seed"},
}


class StepBook:
    """One optimizer's policy as it runs: each step's kind (``PLAIN`` when ρ is 0 in every group,
    whatever the policy: the engine's rule), the steps taken by kind, the policy's clock."""

    def __init__(self, policy: StepPolicy) -> None:
        self.policy = policy
        self.counts = dict.fromkeys(KINDS, 0)

    def plan(self, groups: list[dict[str, Any]]) -> str:
        """This step's kind, or ``DECIDE`` (then the policy's ``decide``)."""
        if all(float(g["rho"]) == 0.0 for g in groups):
            return PLAIN
        return self.policy.plan()

    def end(self, kind: str, taken: bool | None) -> None:
        """After a step of ``kind`` (``taken``: as :meth:`StepPolicy.advance`)."""
        self.counts[kind] += 1
        self.policy.advance(kind, taken)

    def scalars(self, method: str, skipped_steps: int) -> Scalars:
        """The optimizer-wide values a checkpoint saves."""
        fresh, reuse, plain = (self.counts[k] for k in KINDS)
        policy = self.policy
        return Scalars(
            method, skipped_steps, policy.since_fresh, (fresh, reuse, plain), policy.dumps()
        )

    def load(self, scalars: Scalars) -> None:
        """The counts and the policy's state from a checkpoint's scalars; a policy's state saved
        by another policy is not used."""
        self.counts = dict(zip(KINDS, scalars.step_counts, strict=True))
        saved = policy_name(scalars.policy)
        if saved == self.policy.name:
            self.policy.loads(scalars.policy)  # type: ignore[arg-type]
        elif saved is None and self.policy.reuses == "direction":  # before policies were saved
            since = scalars.steps_since_fresh_perturbation
            self.policy.since_fresh = None if since is None else int(since)


def make_policy(
    policy: str | StepPolicy | None = None, perturb_every: int = 1, **options: Any
) -> StepPolicy:
    """The policy of the engine's arguments: a :class:`StepPolicy`, or a name with the spec
    options (:data:`SPEC_OPTIONS`); ``perturb_every=k > 1`` is ``reuse_direction`` with every=k.
    An option the chosen policy does not use is an error, never ignored."""
    if isinstance(policy, StepPolicy):
        if options or perturb_every != 1:
            raise ValueError("pass the policy's options to its constructor, not beside it")
        return policy
    if perturb_every != 1:
        if policy not in (None, "reuse_direction") or "every" in options:
            raise ValueError(
                "perturb_every=k is the policy reuse_direction with every=k: pass one of them"
            )
        policy, options = "reuse_direction", {**options, "every": perturb_every}
    name = policy or "every_step"
    if name not in POLICIES:
        raise ValueError(f"unknown step policy {name!r}; choose one of {', '.join(POLICIES)}")
    unused = sorted(set(options) - _USES[name])
    if unused:
        raise ValueError(
            f"step policy {name!r} takes no option {', '.join(unused)} (its options: "
            f"{', '.join(sorted(_USES[name])) or 'none'})"
        )
    if "every" in _USES[name]:
        every = options.get("every")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"step policy {name!r} needs every=<an integer >= 1>, got {every!r}")
    opt = {**SPEC_DEFAULTS, **options}
    if name == "looksam" and not math.isfinite(opt["looksam_alpha"]):
        raise ValueError("looksam_alpha must be a finite number")
    if name == "every_step":
        return EveryStep()
    if name == "reuse_direction":
        return ReuseDirection(opt["every"])
    if name == "interval":
        return Interval(opt["every"])
    if name == "looksam":
        return LookSAM(opt["every"], opt["looksam_alpha"])
    if name == "aesam":
        return AESAM(
            opt["aesam_delta"], opt["aesam_c_start"], opt["aesam_c_end"], opt["total_steps"]
        )
    return RandomSwitch(opt["rst_p"], opt["rst_p_end"], opt["total_steps"], opt["policy_seed"])
