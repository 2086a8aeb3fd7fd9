"""Preconditioned SAM and multi-step GA-SAM against references written here from the maths.

The references (``helpers.optim``: ``adam_preconditioner_reference``, ``GasamReference``) are
plain torch on lists of tensors, written from docs/algorithms.md and ALGORITHMS.md; gradients at
a point come from ``torch.func.functional_call``, never from the optimizer under test. Only the
public API of ``flatlm.optim`` is used, plus AdamW's own state (``opt.base_optimizer.state``),
which is what the preconditioner is defined from.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.optim import create
from helpers.optim import (
    GasamReference,
    SpyAdamW,
    adam_preconditioner_reference,
    ce,
    flat_norm,
    make_batch,
    make_mlp,
    params_of,
)

# PSAM's ``moment`` option -> the reference's ``current_moment`` flag. "current" (the default,
# ALGORITHMS.md): this step's clean gradient folded into AdamW's v, bias-corrected for step
# t + 1; "previous": AdamW's v as its last step left it, bias-corrected for t (P = I without
# state), flatlm's only rule before 0.2.
CURRENT_MOMENT_FLAG = {"current": True, "previous": False}


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _logits_at(model: nn.Module, tensors: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(model, dict(zip(_names(model), tensors, strict=True)), (x,))


def _grad_at(model, x, y, point: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇L at ``point`` (mean cross-entropy), computed on detached copies: the model is untouched."""
    ts = [t.detach().clone().requires_grad_() for t in point]
    return list(torch.autograd.grad(F.cross_entropy(_logits_at(model, ts, x), y), ts))


def _functional_grad_at(model, x, y, clean, point) -> list[torch.Tensor]:
    """J(point)ᵀ r(clean): the clean pass's dlogits pulled back through the Jacobian at point."""
    logits = _logits_at(model, [t.detach() for t in clean], x).requires_grad_()
    (r,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    ts = [t.detach().clone().requires_grad_() for t in point]
    return list(torch.autograd.grad(_logits_at(model, ts, x), ts, grad_outputs=r))


def _assert_lists_close(got, want, **tol) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **tol)


# --- Preconditioned SAM: ε = ρ P⁻¹g/‖P⁻¹g‖ with parameters at different step counts -------------


def _reference_epsilon(opt, grads, rho, beta2, eps, *, current_moment, common_step=None):
    """ε = ρ P⁻¹g/‖P⁻¹g‖ over the parameters with a gradient, P from AdamW's state.

    ``common_step`` replaces every parameter's own step count (a deliberately wrong variant,
    used below to show the check can tell).
    """
    state = opt.base_optimizer.state
    u = []
    for p, g in zip(_params(opt), grads, strict=True):
        if g is None:
            u.append(None)
            continue
        st = state.get(p, {})
        v = st.get("exp_avg_sq")
        step = float(st["step"]) if "step" in st else 0.0
        if common_step is not None and v is not None:
            step = common_step
        precond = adam_preconditioner_reference(
            g, v, step, beta2=beta2, eps=eps, current_moment=current_moment
        )
        u.append(g / precond)
    norm = flat_norm([ui for ui in u if ui is not None])
    return [None if ui is None else rho * ui / norm for ui in u]


def _params(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _max_rel_diff(a, b) -> float:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if y is not None]
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in pairs)


@pytest.mark.parametrize("moment", [None, "current", "previous"])
@pytest.mark.parametrize("adam_eps", [1e-8, 1e-3])
@pytest.mark.parametrize("name", ["psam", "pfsam"])
def test_preconditioned_eps_with_parameters_at_different_step_counts(name, adam_eps, moment):
    # fc1.weight has no gradient for the first 3 steps (no AdamW state, not perturbed), then
    # joins: AdamW's step counts are then 0 (no state), 1, 2 for it and 3, 4, 5 for the others,
    # so the bias corrections differ by up to 5x between parameters and the relative scale of
    # P⁻¹g across them depends on each parameter's own t. moment=None is the default.
    rho, beta2 = 0.1, 0.999
    current_moment = CURRENT_MOMENT_FLAG[moment or "current"]
    model = make_mlp()
    opt = create(
        name,
        model.parameters(),
        base_optimizer=SpyAdamW,
        rho=rho,
        lr=0.01,
        betas=(0.9, beta2),
        eps=adam_eps,
        **({} if moment is None else {"moment": moment}),
    )
    params = _params(opt)
    late = model.fc1.weight
    late.requires_grad_(False)
    for i in range(6):
        if i == 3:
            late.requires_grad_(True)
        x, y = make_batch(seed=10 + i)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        want = _reference_epsilon(opt, grads, rho, beta2, adam_eps, current_moment=current_moment)
        got = opt.perturbation()
        _assert_lists_close(got, want, rtol=1e-12, atol=1e-15)

        if i >= 4:  # fc1.weight at a step count of its own: the check can tell
            common = float(max(float(s["step"]) for s in opt.base_optimizer.state.values()))
            wrong = _reference_epsilon(
                opt, grads, rho, beta2, adam_eps, current_moment=current_moment, common_step=common
            )
            assert _max_rel_diff(got, wrong) > 0.05
            other = _reference_epsilon(
                opt, grads, rho, beta2, adam_eps, current_moment=not current_moment
            )
            assert _max_rel_diff(got, other) > 1e-3  # and the two moments differ here

        # The gradient AdamW is handed: ∇L(θ+ε), or for pfsam J(θ+ε)ᵀ r(θ), with ε the reference.
        theta = params_of(model)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        point = [t if e is None else t + e for t, e in zip(theta, want, strict=True)]
        if name == "psam":
            full = _grad_at(model, x, y, point)
        else:
            full = _functional_grad_at(model, x, y, theta, point)
        expected = [None if e is None else gi for e, gi in zip(want, full, strict=True)]
        _assert_lists_close(opt.base_optimizer.seen_grads[-1], expected, rtol=1e-10, atol=1e-14)
        _assert_lists_close(opt.base_optimizer.seen_params[-1], theta, rtol=0, atol=0)

    steps = {p: float(s["step"]) for p, s in opt.base_optimizer.state.items()}
    assert steps[late] == 3 and all(t == 6 for p, t in steps.items() if p is not late)


# --- GA-SAM: K projected ascent steps against the hand-written ellipsoid --------------------------


@pytest.mark.parametrize(
    ("alpha", "normalize", "max_scale", "radius"),
    [
        (-1.0, True, 100.0, None),
        (1.0, True, 100.0, "euclidean"),
        (-1.0, True, 100.0, "ellipsoid"),
        (1.0, True, 100.0, "ellipsoid"),
        (-1.0, False, 100.0, "ellipsoid"),
        (-1.0, True, 3.0, "euclidean"),
        (-1.0, True, 3.0, "ellipsoid"),
    ],
)
def test_gasam_multi_step_ascent_equals_the_hand_written_reference(
    alpha, normalize, max_scale, radius
):
    # Every ascent point (recorded at each forward) and the parameters after each step against
    # GasamReference: D from its own bias-corrected EMA (β = 0.9, so t matters), K = 3 steps of
    # D²g_k/(K‖n_k‖) with the gradient at the current point and D from the clean gradient
    # (n_k = D²g_k for the default Euclidean radius, Dg_k for the ellipsoid), each radially
    # projected back onto the set, the descent gradient at the last point, and a hand-written
    # SGD step. radius=None is the default. (Each step has length 1/K in the set's own norm, so
    # by the triangle inequality δ never leaves the set and the projection is an exact no-op
    # here; the points are still checked.)
    rho, lr, beta, k_steps = 0.3, 0.05, 0.9, 3
    model = make_mlp()
    opt = create(
        "gasam",
        model.parameters(),
        base_optimizer=torch.optim.SGD,
        rho=rho,
        lr=lr,
        alpha=alpha,
        beta=beta,
        normalize=normalize,
        ascent_steps=k_steps,
        max_scale=max_scale,
        **({} if radius is None else {"radius": radius}),
    )
    ref = GasamReference(
        rho,
        alpha=alpha,
        beta=beta,
        normalize=normalize,
        ascent_steps=k_steps,
        max_scale=max_scale,
        radius=radius or "euclidean",
    )
    theta = params_of(model)
    for i in range(3):
        x, y = make_batch(seed=20 + i)
        points: list[list[torch.Tensor]] = []

        def forward(x=x, points=points):
            points.append(params_of(model))
            return model(x)

        opt.step(forward=forward, loss_fn=ce(y))
        descent, epsilons = ref.step(theta, lambda pt, x=x, y=y: _grad_at(model, x, y, pt))
        assert len(points) == k_steps + 1  # the clean pass and one pass per ascent step
        _assert_lists_close(points[0], theta, rtol=1e-11, atol=1e-14)
        for point, eps in zip(points[1:], epsilons, strict=True):
            want = [t + e for t, e in zip(theta, eps, strict=True)]
            _assert_lists_close(point, want, rtol=1e-11, atol=1e-14)
        theta = [t - lr * g for t, g in zip(theta, descent, strict=True)]
        _assert_lists_close(params_of(model), theta, rtol=1e-11, atol=1e-14)
    # the K steps went somewhere the first one alone does not: the multi-step path is exercised
    assert _max_rel_diff(epsilons[-1], epsilons[0]) > 1e-3
    if max_scale == 3.0:
        assert ref.clipped > 0  # the clip of D was active in this case
    if radius in (None, "euclidean"):  # steps of Euclidean length ρ/K, inside the ρ-ball
        assert float(flat_norm(epsilons[0])) == pytest.approx(rho / k_steps, rel=1e-12)
        assert float(flat_norm(epsilons[-1])) <= rho * (1 + 1e-12)
