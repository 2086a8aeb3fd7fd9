"""GA-SAM (flatlm's formulation) against closed forms computed by hand from its EMA state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlm.optim import GASAM, SAM
from helpers.optim import SpySGD, ce, make_batch, make_mlp


def test_alpha_zero_single_step_is_sam():
    batches = [make_batch(seed=s) for s in range(4)]
    a, b = make_mlp(), make_mlp()
    ga = GASAM(a.parameters(), torch.optim.AdamW, rho=0.2, alpha=0.0, lr=0.01)
    sam = SAM(b.parameters(), torch.optim.AdamW, rho=0.2, lr=0.01)
    for x, y in batches:
        ga.step(forward=lambda: a(x), loss_fn=ce(y))
        sam.step(forward=lambda: b(x), loss_fn=ce(y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-15, atol=1e-15)


def _hand_ema(grads_over_time, beta):
    ema = [torch.zeros_like(g) for g in grads_over_time[0]]
    for grads in grads_over_time:
        ema = [beta * e + (1 - beta) * g * g for e, g in zip(ema, grads, strict=True)]
    return ema


def _hand_scale(ema, t, beta, alpha, normalize, xi=1e-12, max_scale=100.0):
    s = [torch.sqrt(e / (1 - beta**t)) for e in ema]
    n = sum(x.numel() for x in s)
    rms = torch.sqrt(sum((x**2).sum() for x in s) / n)
    d = [((x / rms + xi) ** alpha).clamp(1 / max_scale, max_scale) for x in s]
    if not normalize:
        d = [di * (rms**alpha).clamp(1 / max_scale, max_scale) for di in d]
    return d


@pytest.mark.parametrize(
    ("normalize", "radius"), [(True, "euclidean"), (True, "ellipsoid"), (False, "ellipsoid")]
)
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.0])
def test_eps_equals_the_closed_form_from_the_bias_corrected_ema(alpha, normalize, radius):
    beta, rho = 0.9, 0.3
    model = make_mlp()
    opt = GASAM(
        model.parameters(),
        SpySGD,
        rho=rho,
        alpha=alpha,
        beta=beta,
        normalize=normalize,
        radius=radius,
        lr=0.01,
    )
    grads_seen = []
    for s in range(3):
        x, y = make_batch(seed=s)
        opt.zero_grad()
        ce(y)(model(x)).backward()
        grads_seen.append([p.grad.clone() for p in model.parameters()])
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))

    # The committed state is the bias-corrected EMA of the clean gradients, t = 3.
    ema = _hand_ema(grads_seen, beta)
    for p, e in zip(model.parameters(), ema, strict=True):
        torch.testing.assert_close(opt.state[p]["grad_sq_ema"], e, rtol=1e-13, atol=1e-18)
        assert opt.state[p]["step"].item() == 3

    # ε of the next step uses the EMA including that step's gradient (t = 4).
    x, y = make_batch(seed=9)
    opt.zero_grad()
    ce(y)(model(x)).backward()
    g = [p.grad.clone() for p in model.parameters()]
    d = _hand_scale(_hand_ema([*grads_seen, g], beta), 4, beta, alpha, normalize)
    d2g = [di * di * gi for di, gi in zip(d, g, strict=True)]
    # ellipsoid: ρ bounds ‖ε ⊘ D‖, ε = ρ D²g/‖Dg‖; euclidean: ‖ε‖ = ρ, ε = ρ D²g/‖D²g‖
    n = [di * gi for di, gi in zip(d, g, strict=True)] if radius == "ellipsoid" else d2g
    norm = torch.sqrt(sum((v**2).sum() for v in n))
    want = [rho * v / norm for v in d2g]
    got = opt.perturbation()
    for e, w in zip(got, want, strict=True):
        torch.testing.assert_close(e, w, rtol=1e-11, atol=1e-16)
    if radius == "euclidean":
        assert math.isclose(torch.sqrt(sum((e**2).sum() for e in got)).item(), rho, rel_tol=1e-12)
    # perturbation() changed nothing
    assert all(opt.state[p]["step"].item() == 3 for p in model.parameters())


def _quadratic(curvatures):
    a = torch.tensor(curvatures, dtype=torch.float64)
    return a, (lambda f: 0.5 * (a * f * f).sum())


def _record_points(theta):
    points = []

    def forward():
        points.append(theta.detach().clone())
        return theta * 1.0

    return points, forward


@pytest.mark.parametrize("alpha", [1.0, 0.0, -0.5])
def test_multi_step_ascent_stays_inside_the_ellipsoid(alpha):
    a, loss = _quadratic([50.0, 5.0, 1.0, 0.2, 0.01])
    theta0 = torch.tensor([0.3, -1.0, 2.0, 0.5, -3.0], dtype=torch.float64)
    theta = nn.Parameter(theta0.clone())
    rho = 0.4
    opt = GASAM([theta], SpySGD, rho=rho, alpha=alpha, ascent_steps=4, lr=0.0)
    points, forward = _record_points(theta)
    opt.step(forward=forward, loss_fn=loss)
    assert len(points) == 5  # the clean pass + K = 4 ascent points
    g = a * theta0
    d = _hand_scale([g * g * (1 - 0.99)], 1, 0.99, alpha, True)[0]
    for point in points[1:]:
        eps = point - theta0
        assert torch.linalg.vector_norm(eps / d) <= rho * (1 + 1e-9)
    assert torch.equal(theta.detach(), theta0)  # restored exactly (lr = 0)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_multi_step_reaches_a_higher_loss_inside_the_set_than_one_step(alpha):
    # Very unequal curvature: one linearised step points along g, far from the worst corner.
    _, loss = _quadratic([100.0, 1.0, 0.01])
    theta0 = torch.tensor([0.01, 1.0, 10.0], dtype=torch.float64)
    final_losses = {}
    for k in (1, 8):
        theta = nn.Parameter(theta0.clone())
        opt = GASAM([theta], SpySGD, rho=1.0, alpha=alpha, ascent_steps=k, lr=0.0)
        points, forward = _record_points(theta)
        opt.step(forward=forward, loss_fn=loss)
        final_losses[k] = float(loss(points[-1]))
    assert final_losses[8] > final_losses[1] * 1.5, final_losses


@pytest.mark.parametrize("alpha", [-3.0, -1.0, -0.5, 0.5, 1.0, 3.0])
@pytest.mark.parametrize(
    ("normalize", "radius"), [(True, "euclidean"), (True, "ellipsoid"), (False, "ellipsoid")]
)
def test_no_alpha_gives_a_non_finite_step(alpha, normalize, radius):
    # Gradients spanning 60 orders of magnitude, and exact zeros: (ŝ + ξ)^α alone would explode.
    w = torch.tensor([1e-30, 1e-12, 0.0, 1.0, 1e6, 1e30], dtype=torch.float64)
    theta = nn.Parameter(torch.ones(6, dtype=torch.float64))
    rho, max_scale = 0.1, 100.0
    opt = GASAM([theta], SpySGD, rho=rho, alpha=alpha, normalize=normalize, radius=radius, lr=0.0)
    points, forward = _record_points(theta)
    for _ in range(3):
        opt.step(forward=forward, loss_fn=lambda f: (w * f).sum())
    for point in points:
        eps = point - 1.0
        assert torch.isfinite(eps).all()
        # euclidean: ‖ε‖ = ρ; ellipsoid: ‖ε‖ ≤ ρ·max D, and D ≤ max_scale (normalized) or
        # max_scale² (times the overall factor)
        bound = rho if radius == "euclidean" else rho * max_scale ** (1 if normalize else 2)
        assert torch.linalg.vector_norm(eps) <= bound * (1 + 1e-9)
    assert opt.skipped_steps == 0


def test_bias_correction_makes_the_first_strength_the_gradient_magnitude():
    # After one step the bias-corrected EMA is exactly g², so s = |g|.
    theta = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    w = torch.tensor([0.5, 4.0, -1.0], dtype=torch.float64)
    opt = GASAM([theta], SpySGD, rho=0.1, beta=0.999, normalize=False, radius="ellipsoid", lr=0.0)
    opt.step(forward=lambda: theta * 1.0, loss_fn=lambda f: (w * f).sum())
    ema = opt.state[theta]["grad_sq_ema"]
    torch.testing.assert_close(torch.sqrt(ema / (1 - 0.999)), w.abs(), rtol=1e-12, atol=0)
    assert math.isclose(opt.state[theta]["step"].item(), 1.0)


def test_normalize_false_with_a_euclidean_radius_is_refused():
    # D·c for one global c is normalised away by ρ D²g/‖D²g‖: the option would do nothing.
    with pytest.raises(ValueError, match="radius='ellipsoid'"):
        GASAM(make_mlp().parameters(), normalize=False, lr=0.01)
