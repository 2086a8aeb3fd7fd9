"""Gradient combinations: update directions made from the clean gradient g and the perturbed
one g_s: LookSAM's stored g_v (a step policy), and the gradient rules of WSAM and GSAM, which
replace g_s by a combination of both before the base optimizer steps (:class:`GradientRule`),
and bSAM's, which hands g to its base optimizer beside g_s (:class:`NoisyScale`).

The engine keeps a copy of the clean gradient (:class:`CleanGradient`) only on a fresh step of a
policy that asks for it (``StepPolicy.keeps_clean_gradient``) or of a method with a gradient
rule. Everything works on this rank's
local shards; inner products and norms add their partial sums over the shards inside
``sharded.reducing`` (FSDP2), so every rank gets the global values.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flatlm.optim import sharded
from flatlm.optim.directions import global_norm
from flatlm.optim.perturbation import Perturbation

__all__ = [
    "CleanGradient",
    "GradientRule",
    "Kept",
    "NoisyScale",
    "SurrogateGap",
    "WeightedSharpness",
    "add_correction_",
    "combine_",
    "correct_",
    "keep_clean",
    "orthogonal_of",
    "orthogonal_part",
]

State = MutableMapping[Tensor, dict[str, Any]]


@dataclass
class Kept:
    """Per-parameter tensors (local shards) of the parameters that had a gradient."""

    params: list[Tensor]
    values: list[Tensor]


def _with_grad(groups: list[dict[str, Any]]) -> list[Tensor]:
    return [p for g in groups for p in g["params"] if p.grad is not None]


def keep_clean(groups: list[dict[str, Any]]) -> Kept:
    """A copy of the clean gradient now in ``p.grad`` (the perturbed pass overwrites it)."""
    params = _with_grad(groups)
    return Kept(params, [sharded.local(p.grad).clone() for p in params])  # type: ignore[arg-type]


def orthogonal_of(kept: Kept) -> Kept:
    """LookSAM's g_v from the kept clean g and the perturbed g_s now in ``p.grad`` (zero where
    a parameter lost its gradient)."""
    perturbed = [
        sharded.local(p.grad) if p.grad is not None else torch.zeros_like(c)
        for p, c in zip(kept.params, kept.values, strict=True)
    ]
    return Kept(kept.params, orthogonal_part(perturbed, kept.values) if kept.params else [])


def store(state: State, kept: Kept, key: str) -> None:
    """Keep ``kept`` in the optimizer's state under ``key`` (sharded like the parameters)."""
    if kept.params:
        torch._foreach_copy_(Perturbation.stored(state, kept.params, key), kept.values)


def correct_(groups: list[dict[str, Any]], state: State, key: str, alpha: float) -> None:
    """LookSAM between fresh steps: g ← g + α‖g‖/‖g_v‖·g_v on the gradient in ``p.grad``, for
    the parameters with a stored g_v."""
    params = [p for p in _with_grad(groups) if key in state.get(p, {})]
    if params:
        grads = sharded.locals_of([p.grad for p in params])  # type: ignore[misc]
        add_correction_(grads, Perturbation.stored(state, params, key), alpha)


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """⟨a, b⟩ over every tensor (and every shard inside ``sharded.reducing``), ≥ float32."""
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    partial = torch.stack([(x.to(dtype) * y.to(dtype)).sum() for x, y in zip(a, b, strict=True)])
    return sharded.sum_over_shards(partial.sum())


def orthogonal_part(perturbed: list[Tensor], clean: list[Tensor]) -> list[Tensor]:
    """g_v = g_s − (⟨g_s, g⟩/‖g‖²)·g (new tensors); g = 0 gives g_v = g_s."""
    sq = _dot(clean, clean)
    coef = _dot(perturbed, clean) / sq.clamp_min(torch.finfo(sq.dtype).tiny)
    out = torch._foreach_mul(clean, (-coef).to(clean[0].dtype))
    torch._foreach_add_(out, perturbed)
    return out


def add_correction_(grads: list[Tensor], stored: list[Tensor], alpha: float) -> None:
    """g ← g + α·(‖g‖/‖g_v‖)·g_v in place; ‖g_v‖ = 0 adds nothing."""
    gv_norm = global_norm(stored)
    coef = alpha * global_norm(grads) / gv_norm.clamp_min(torch.finfo(gv_norm.dtype).tiny)
    torch._foreach_add_(grads, torch._foreach_mul(stored, coef.to(grads[0].dtype)))


class GradientRule:
    """How a fresh step's update gradient is made from the clean g and the perturbed g_s."""

    #: True: the base optimizer gets the clean g too (its ``noisy_grads``, for one step).
    hands_clean_to_base: ClassVar[bool] = False

    def validate(self) -> None:
        """Raise at construction for options out of range."""
        return None

    def __call__(self, perturbed: list[Tensor], clean: list[Tensor]) -> None:
        """Overwrite ``perturbed`` (g_s, local shards) with the update gradient."""
        raise NotImplementedError


@dataclass(frozen=True)
class WeightedSharpness(GradientRule):
    """WSAM (Yue et al., KDD 2023): the gradient of L + γ/(1−γ)·(L(θ+ε) − L(θ)), the
    sharpness weighted by γ/(1−γ): g + γ/(1−γ)·(g_s − g) (γ = ½ is SAM, γ = 0 the base)."""

    gamma: float = 0.9

    def validate(self) -> None:
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma!r}")

    def __call__(self, perturbed: list[Tensor], clean: list[Tensor]) -> None:
        weight = self.gamma / (1.0 - self.gamma)
        # g_s + (1 − w)(g − g_s) = g + w(g_s − g)
        torch._foreach_lerp_(perturbed, clean, 1.0 - weight)


@dataclass(frozen=True)
class SurrogateGap(GradientRule):
    """GSAM (Zhuang et al., ICLR 2022): g_s − α·g_⊥, g_⊥ = g − (⟨g, g_s⟩/‖g_s‖²)·g_s the part
    of the clean gradient orthogonal to g_s (norms and inner products global, over every
    group and shard): descending on the surrogate gap without changing the SAM loss to first
    order."""

    alpha: float = 0.4

    def validate(self) -> None:
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")

    def __call__(self, perturbed: list[Tensor], clean: list[Tensor]) -> None:
        vertical = orthogonal_part(clean, perturbed)
        torch._foreach_add_(perturbed, vertical, alpha=-self.alpha)


@dataclass(frozen=True)
class NoisyScale(GradientRule):
    """bSAM (Möllenhoff & Khan, ICLR 2023): the update gradient stays g_ε = ∇L(θ+ε); the clean
    pass's g (taken at the noisy point θ + e) goes to the base optimizer, whose scale s it
    updates (:class:`flatlm.optim.bsam.BSAMBase`)."""

    hands_clean_to_base: ClassVar[bool] = True

    def __call__(self, perturbed: list[Tensor], clean: list[Tensor]) -> None:
        return None


def combine_(kept: Kept, rule: GradientRule) -> None:
    """Apply ``rule`` to the gradients now in ``p.grad`` (the perturbed ones) with the kept
    clean ones, for the parameters that have both."""
    pairs = [
        (p.grad, c) for p, c in zip(kept.params, kept.values, strict=True) if p.grad is not None
    ]
    if pairs:
        rule(sharded.locals_of([g for g, _ in pairs]), [c for _, c in pairs])  # type: ignore[misc]


class CleanGradient:
    """What one optimizer does with a fresh step's clean g: keep it when its policy
    (``keeps_clean_gradient``, LookSAM) or its gradient rule (WSAM, GSAM) needs it, combine it
    with the perturbed g_s, and LookSAM's correction between fresh steps."""

    def __init__(self, policy: Any, rule: GradientRule | None) -> None:
        self.policy, self.rule = policy, rule  # policy: a flatlm.optim.policies.StepPolicy
        self.kept: Kept | None = None
        #: The clean g for the base optimizer (bSAM), between :meth:`combine` and its step.
        self.for_base: Kept | None = None

    def keep(self, groups: list[dict[str, Any]]) -> None:
        if self.policy.keeps_clean_gradient or self.rule is not None:
            self.kept = keep_clean(groups)

    def combine(self) -> Kept | None:
        """The rule applied to the g_s now in ``p.grad`` (the kept g dropped); returns LookSAM's
        g_v, for :meth:`store` once the step is taken (None: nothing to store)."""
        kept, self.kept = self.kept, None
        orthogonal = None
        if kept is not None and self.policy.keeps_clean_gradient:  # LookSAM
            orthogonal = orthogonal_of(kept)
        if kept is not None and self.rule is not None:  # WSAM, GSAM
            combine_(kept, self.rule)
            if self.rule.hands_clean_to_base:  # bSAM
                self.for_base = kept
        return orthogonal

    def store(self, state: State, orthogonal: Kept) -> None:
        store(state, orthogonal, self.policy.stored)

    def correct(self, groups: list[dict[str, Any]], state: State) -> None:
        """LookSAM between fresh steps: the stored g_v added to the clean gradient."""
        correct_(groups, state, self.policy.stored, self.policy.alpha)
