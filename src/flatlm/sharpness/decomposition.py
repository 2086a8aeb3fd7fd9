"""The SAM gradient split into the functional path and the logit path (ALGORITHMS.md):

    ∇L(θ+ε) = J(θ+ε)ᵀ r(θ)  +  J(θ+ε)ᵀ [r(θ+ε) − r(θ)]
              functional path     logit path

Functional-SAM keeps only the first term; the ratio ‖logit‖/‖functional‖ says how much of SAM's
correction goes into changing logit statistics rather than the function itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatlm.sharpness._common import (
    Batch,
    LossFn,
    ParamSpec,
    dot,
    loss_and_grad,
    materialise_batches,
    norm,
    preserved,
    select_params,
    shifted,
)

EpsSpec = Sequence[Tensor | None] | None


def sam_epsilon(grads: Sequence[Tensor], rho: float) -> list[Tensor]:
    """SAM's perturbation ε = ρ g/‖g‖ (zero when g = 0)."""
    gn = float(norm(grads))
    if gn == 0.0:
        return [torch.zeros_like(g) for g in grads]
    return [g * (rho / gn) for g in grads]


def _optimizer_epsilon(
    optimizer: object,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    selected: Sequence[Tensor],
) -> list[Tensor | None]:
    """ε of a flatlm ``SharpnessAwareOptimizer``: fill ``p.grad`` with the clean gradient on the
    batches, ask ``optimizer.perturbation()``, put the held ``p.grad`` back, and keep the entries
    of the selected parameters."""
    opt_params = [p for group in optimizer.param_groups for p in group["params"]]  # type: ignore[attr-defined]
    _, grads = loss_and_grad(model, loss_fn, batches, opt_params)
    held = [p.grad for p in opt_params]
    try:
        for p, g in zip(opt_params, grads, strict=True):
            p.grad = g
        eps = list(optimizer.perturbation())  # type: ignore[attr-defined]
    finally:
        for p, g in zip(opt_params, held, strict=True):
            p.grad = g
    if len(eps) != len(opt_params):
        raise ValueError("optimizer.perturbation() must return one entry per parameter")
    by_id = {id(p): e for p, e in zip(opt_params, eps, strict=True)}
    return [None if by_id.get(id(p)) is None else by_id[id(p)].detach() for p in selected]


def resolve_epsilon(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    selected: Sequence[Tensor],
    *,
    rho: float = 0.05,
    eps: EpsSpec = None,
    optimizer: object | None = None,
    clean_grads: Sequence[Tensor] | None = None,
) -> list[Tensor | None]:
    """The perturbation to evaluate, one entry per selected parameter.

    Priority: an explicit ``eps`` list (aligned with the selected parameters), else
    ``optimizer.perturbation()`` (entries of non-selected parameters are ignored, so the
    perturbation and the measurement use the same parameters), else SAM's ρ g/‖g‖ with g the
    gradient w.r.t. the selected parameters. Must be called inside :func:`preserved`.
    """
    if eps is not None:
        eps = list(eps)
        if len(eps) != len(selected):
            raise ValueError(f"eps has {len(eps)} entries, expected {len(selected)}")
        return [None if e is None else e.detach() for e in eps]
    if optimizer is not None:
        return _optimizer_epsilon(optimizer, model, loss_fn, batches, selected)
    if clean_grads is None:
        _, clean_grads = loss_and_grad(model, loss_fn, batches, selected)
    return list(sam_epsilon(clean_grads, rho))


@dataclass
class SamDecomposition:
    """All vectors are tensor lists over the selected parameters; losses are mean losses."""

    param_names: list[str]
    epsilon: list[Tensor | None]
    loss: float
    loss_perturbed: float
    grad: list[Tensor]
    sam_grad: list[Tensor]
    functional: list[Tensor]
    logit: list[Tensor]

    def summary(self) -> dict[str, float | None]:
        """Plain floats: norms, ratio, cosines (``None`` where a norm is zero)."""
        fn, ln, sn, gn = (
            float(norm(v)) for v in (self.functional, self.logit, self.sam_grad, self.grad)
        )

        def cos(a: list[Tensor], b: list[Tensor], na: float, nb: float) -> float | None:
            return None if na == 0.0 or nb == 0.0 else float(dot(a, b)) / (na * nb)

        eps = [e for e in self.epsilon if e is not None]
        return {
            "loss": self.loss,
            "loss_perturbed": self.loss_perturbed,
            "sam_sharpness": self.loss_perturbed - self.loss,
            "eps_norm": float(norm(eps)) if eps else 0.0,
            "grad_norm": gn,
            "sam_grad_norm": sn,
            "functional_norm": fn,
            "logit_norm": ln,
            "logit_functional_ratio": None if fn == 0.0 else ln / fn,
            "cos_sam_functional": cos(self.sam_grad, self.functional, sn, fn),
            "cos_sam_logit": cos(self.sam_grad, self.logit, sn, ln),
            "cos_sam_grad": cos(self.sam_grad, self.grad, sn, gn),
        }


def sam_decomposition(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: ParamSpec = None,
    rho: float = 0.05,
    eps: EpsSpec = None,
    optimizer: object | None = None,
    eval_mode: bool = True,
) -> SamDecomposition:
    """Split SAM's gradient at θ+ε into its functional and logit paths, with autograd.

    At θ: logits F, r(θ) = ∂(w_b ℓ_b)/∂F per batch, and g. At θ+ε: the functional path is
    ``logits.backward(r(θ))`` and the logit path ``logits.backward(r(θ+ε) − r(θ))``; SAM's own
    gradient ∇L(θ+ε) is computed separately from the loss, so ``functional + logit == sam_grad``
    is a real check. Parameters, ``.grad`` and train/eval flags are restored exactly.
    """
    bs = materialise_batches(batches)
    sel = select_params(model, params)
    ps = [p for _, p in sel]
    with preserved(model, eval_mode):
        # clean pass: r(θ) per batch, g, L(θ)
        r_clean: list[Tensor] = []
        grads = [torch.zeros_like(p) for p in ps]
        loss0 = 0.0
        for b in bs:
            logits = model(b.inputs)
            z = logits.detach().requires_grad_(True)
            lb = loss_fn(z, b.targets) * b.weight
            (r,) = torch.autograd.grad(lb, z)
            r_clean.append(r)
            for acc, g in zip(grads, _vjp(logits, ps, r), strict=True):
                acc.add_(g)
            loss0 += float(lb.detach().double())
        epsilon = resolve_epsilon(
            model, loss_fn, bs, ps, rho=rho, eps=eps, optimizer=optimizer, clean_grads=grads
        )
        func = [torch.zeros_like(p) for p in ps]
        logit = [torch.zeros_like(p) for p in ps]
        sam = [torch.zeros_like(p) for p in ps]
        loss1 = 0.0
        with shifted(ps, epsilon):
            for b, r0 in zip(bs, r_clean, strict=True):
                logits = model(b.inputs)
                lb = loss_fn(logits, b.targets) * b.weight
                (r1,) = torch.autograd.grad(lb, logits, retain_graph=True)
                for acc, g in zip(sam, _vjp(lb, ps, None, retain=True), strict=True):
                    acc.add_(g)
                for acc, g in zip(func, _vjp(logits, ps, r0, retain=True), strict=True):
                    acc.add_(g)
                for acc, g in zip(logit, _vjp(logits, ps, r1 - r0), strict=True):
                    acc.add_(g)
                loss1 += float(lb.detach().double())
    return SamDecomposition(
        param_names=[n for n, _ in sel],
        epsilon=epsilon,
        loss=loss0,
        loss_perturbed=loss1,
        grad=grads,
        sam_grad=sam,
        functional=func,
        logit=logit,
    )


def _vjp(
    out: Tensor, ps: Sequence[Tensor], cot: Tensor | None, retain: bool = False
) -> list[Tensor]:
    gs = torch.autograd.grad(
        out, list(ps), grad_outputs=cot, retain_graph=retain, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps, strict=True)]
