"""Functional-SAM and the preconditioned variants against independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

from flatlm.optim import (
    SAM,
    FunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
)
from helpers.optim import SpySGD, ce, make_batch, make_mlp


def _flat_norm(tensors):
    return torch.sqrt(sum((t**2).sum() for t in tensors))


def test_functional_sam_on_a_model_linear_in_theta_is_the_base_update():
    # F = Wx + b: J does not depend on θ, so J(θ+ε)ᵀ r(θ) = J(θ)ᵀ r(θ) = g.
    x, y = make_batch()
    torch.manual_seed(0)
    model = nn.Linear(5, 4).double()
    ref = nn.Linear(5, 4).double()
    ref.load_state_dict(model.state_dict())
    opt = FunctionalSAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=0.01)
    base = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for _ in range(4):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
        base.zero_grad()
        ce(y)(ref(x)).backward()
        base.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def _functional_reference(model, x, y, rho):
    """J(θ+ε)ᵀ r(θ) and ∇L(θ+ε) with torch.func, independent of flatlm."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits_of(params):
        return functional_call(model, params, (x,))

    g = grad(lambda p: F.cross_entropy(logits_of(p), y))(theta)
    norm = _flat_norm(list(g.values()))
    shifted = {n: theta[n] + rho * g[n] / norm for n in theta}
    r = grad(lambda z: F.cross_entropy(z, y))(logits_of(theta))
    _, pullback = vjp(logits_of, shifted)
    (functional,) = pullback(r)
    sam = grad(lambda p: F.cross_entropy(logits_of(p), y))(shifted)
    return list(functional.values()), list(sam.values())


def test_functional_sam_gradient_is_the_vjp_of_the_moved_jacobian_with_clean_dlogits():
    x, y = make_batch()
    model = make_mlp()
    expected, sam_grad = _functional_reference(make_mlp(), x, y, rho=0.3)
    opt = FunctionalSAM(model.parameters(), SpySGD, rho=0.3, lr=0.1)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    got = opt.base_optimizer.seen_grads[0]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # ... and that is not SAM's gradient on a nonlinear model.
    assert max((a - b).abs().max() for a, b in zip(got, sam_grad, strict=True)) > 1e-4

    model2 = make_mlp()
    sam = SAM(model2.parameters(), SpySGD, rho=0.3, lr=0.1)
    sam.step(forward=lambda: model2(x), loss_fn=ce(y))
    for a, b in zip(sam.base_optimizer.seen_grads[0], sam_grad, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_functional_methods_refuse_the_classic_protocols_with_a_clear_error():
    model = make_mlp()
    opt = FunctionalSAM(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="dlogits"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="dlogits"):
        opt.step(lambda: None)


def _hand_preconditioned_eps(opt, rho, moment="current"):
    """ε = ρ P⁻¹g/‖P⁻¹g‖ with P = √v̂ + eps, read from the AdamW state by hand: v̂ = v/(1−β₂ᵗ)
    ("previous"), or with this gradient folded in, (β₂v + (1−β₂)g²)/(1−β₂ᵗ⁺¹) ("current")."""
    beta2, eps_adam = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    u = []
    for p in opt.param_groups[0]["params"]:
        st = opt.base_optimizer.state[p]
        v, t = st["exp_avg_sq"], st["step"].item()
        if moment == "current":
            v, t = beta2 * v + (1 - beta2) * p.grad**2, t + 1
        vhat = v / (1 - beta2**t)
        u.append(p.grad / (vhat.sqrt() + eps_adam))
    norm = _flat_norm(u)
    return [rho * ui / norm for ui in u]


@pytest.mark.parametrize("moment", ["current", "previous"])
@pytest.mark.parametrize("cls", [PreconditionedSAM, PreconditionedFunctionalSAM])
def test_preconditioned_eps_equals_the_hand_computed_direction(cls, moment):
    x, y = make_batch()
    model = make_mlp()
    opt = cls(
        model.parameters(), torch.optim.AdamW, rho=0.2, lr=0.01, betas=(0.9, 0.95), moment=moment
    )
    for _ in range(3):  # build up a second moment
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    x2, y2 = make_batch(seed=7)
    opt.zero_grad()
    ce(y2)(model(x2)).backward()
    want = _hand_preconditioned_eps(opt, 0.2, moment)
    for got, w in zip(opt.perturbation(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("moment", ["current", "previous"])
def test_preconditioned_sam_step_uses_that_eps(moment):
    # The gradient handed to the base is ∇L(θ + ε_hand), checked with torch.func.
    x, y = make_batch()
    model = make_mlp()
    opt = PreconditionedSAM(model.parameters(), torch.optim.AdamW, rho=0.2, lr=0.01, moment=moment)
    for _ in range(2):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    opt.zero_grad()
    ce(y)(model(x)).backward()
    eps = _hand_preconditioned_eps(opt, 0.2, moment)
    names = [n for n, _ in model.named_parameters()]
    shifted = {n: p.detach() + e for (n, p), e in zip(model.named_parameters(), eps, strict=True)}
    want = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(shifted)

    seen = {}
    original = opt.base_optimizer.step

    def spy_step(*a, **k):
        seen["g"] = [p.grad.clone() for p in model.parameters()]
        return original(*a, **k)

    opt.base_optimizer.step = spy_step
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    for n, g in zip(names, seen["g"], strict=True):
        torch.testing.assert_close(g, want[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("preconditioned", "plain"),
    [(PreconditionedSAM, SAM), (PreconditionedFunctionalSAM, FunctionalSAM)],
)
def test_first_previous_moment_step_equals_the_unpreconditioned_method(preconditioned, plain):
    x, y = make_batch()
    a, b = make_mlp(), make_mlp()
    opt_a = preconditioned(a.parameters(), torch.optim.AdamW, rho=0.3, lr=0.01, moment="previous")
    opt_b = plain(b.parameters(), torch.optim.AdamW, rho=0.3, lr=0.01)
    opt_a.step(forward=lambda: a(x), loss_fn=ce(y))
    opt_b.step(forward=lambda: b(x), loss_fn=ce(y))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    # From the second step on, P ≠ I and the two differ.
    opt_a.step(forward=lambda: a(x), loss_fn=ce(y))
    opt_b.step(forward=lambda: b(x), loss_fn=ce(y))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("moment", ["current", "previous"])
def test_preconditioned_amsgrad_uses_the_running_maximum(moment):
    x, y = make_batch()
    model = make_mlp()
    opt = PreconditionedSAM(
        model.parameters(), torch.optim.Adam, rho=0.2, lr=0.01, amsgrad=True, moment=moment
    )
    for _ in range(2):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    opt.zero_grad()
    x2, y2 = make_batch(seed=5)  # another batch: the running maximum and v differ somewhere
    ce(y2)(model(x2)).backward()
    beta2, eps_adam = 0.999, 1e-8
    u = []
    for p in model.parameters():
        st = opt.base_optimizer.state[p]
        vmax, t = st["max_exp_avg_sq"], st["step"].item()
        if moment == "current":
            v = beta2 * st["exp_avg_sq"] + (1 - beta2) * p.grad**2
            vmax, t = torch.maximum(vmax, v), t + 1
        vhat = vmax / (1 - beta2**t)
        u.append(p.grad / (vhat.sqrt() + eps_adam))
    norm = _flat_norm(u)
    for got, ui in zip(opt.perturbation(), u, strict=True):
        torch.testing.assert_close(got, 0.2 * ui / norm, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("moment", ["current", "previous"])
def test_preconditioned_amsgrad_where_the_running_maximum_far_exceeds_v(moment):
    # β₂ = 0.5 forgets fast: one large-gradient step (loss × 10) sets max_exp_avg_sq, four
    # small ones (× 0.01) shrink v to 1/16 of it, and the probe (× 20) has g² above the maximum
    # in most coordinates, where this step's moment β₂v + (1−β₂)g² and the one started from the
    # maximum instead differ by up to a factor of two: the test fails if either is swapped in.
    beta2, eps_adam, rho = 0.5, 1e-8, 0.2
    model = make_mlp()
    opt = PreconditionedSAM(
        model.parameters(),
        torch.optim.Adam,
        rho=rho,
        lr=1e-3,
        betas=(0.9, beta2),
        amsgrad=True,
        moment=moment,
    )
    for seed, scale in [(1, 10.0), (2, 0.01), (3, 0.01), (4, 0.01), (5, 0.01)]:
        x, y = make_batch(seed=seed)
        opt.step(forward=lambda x=x: model(x), loss_fn=lambda z, y=y, s=scale: s * ce(y)(z))
    opt.zero_grad()
    x, y = make_batch(seed=6)
    (20.0 * ce(y)(model(x))).backward()

    def reference(start_from_max: bool) -> list[torch.Tensor]:
        u = []
        for p in model.parameters():
            st = opt.base_optimizer.state[p]
            vmax, t = st["max_exp_avg_sq"], st["step"].item()
            if moment == "current":
                v = st["max_exp_avg_sq"] if start_from_max else st["exp_avg_sq"]
                v = beta2 * v + (1 - beta2) * p.grad**2
                vmax, t = torch.maximum(vmax, v), t + 1
            u.append(p.grad / ((vmax / (1 - beta2**t)).sqrt() + eps_adam))
        norm = _flat_norm(u)
        return [rho * ui / norm for ui in u]

    want = reference(start_from_max=False)
    for got, w in zip(opt.perturbation(), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-15)
    ratio = [
        (st["max_exp_avg_sq"] / st["exp_avg_sq"]).min()
        for st in map(opt.base_optimizer.state.get, model.parameters())
    ]
    assert min(ratio) > 10  # the maximum far above v everywhere
    if moment == "current":  # the wrong start would move ε materially
        wrong = reference(start_from_max=True)
        assert _flat_norm([w - x for w, x in zip(want, wrong, strict=True)]) > 0.05 * rho


@pytest.mark.parametrize("cls", [PreconditionedSAM, PreconditionedFunctionalSAM])
def test_first_current_moment_step_preconditions_by_the_gradient_itself(cls):
    # No AdamW state yet: v = (1−β₂)g², bias-corrected for t = 1, is g²; P = |g| + eps, so
    # P⁻¹g = g/(|g| + eps) ≈ sign(g): bounded by 1 per coordinate, never amplified by 1/eps.
    x, y = make_batch()
    model = make_mlp()
    opt = cls(model.parameters(), torch.optim.AdamW, rho=0.3, lr=0.01)
    model.zero_grad()
    ce(y)(model(x)).backward()
    u = [p.grad / (p.grad.abs() + 1e-8) for p in model.parameters()]
    norm = _flat_norm(u)
    for got, ui in zip(opt.perturbation(), u, strict=True):
        torch.testing.assert_close(got, 0.3 * ui / norm, rtol=1e-12, atol=1e-15)


def test_an_adam_subclass_without_the_expected_state_key_is_a_clear_error():
    class OddAdam(torch.optim.AdamW):  # keeps its second moment under another name
        @torch.no_grad()
        def step(self, closure=None):
            for p in (q for g in self.param_groups for q in g["params"] if q.grad is not None):
                self.state[p]["v"] = p.grad**2
                p.add_(p.grad, alpha=-0.01)

    x, y = make_batch()
    model = make_mlp()
    opt = PreconditionedSAM(model.parameters(), OddAdam, rho=0.3, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # no state yet: from v = 0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError, match="no 'exp_avg_sq'"):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # nothing moved


def test_two_phase_protocol_with_an_external_vjp_equals_the_forward_protocol():
    x, y = make_batch()
    a, b = make_mlp(), make_mlp()
    opt_a = FunctionalSAM(a.parameters(), rho=0.3, lr=0.01)
    opt_b = FunctionalSAM(b.parameters(), rho=0.3, lr=0.01)
    for _ in range(3):
        opt_a.step(forward=lambda: a(x), loss_fn=ce(y))
        opt_b.zero_grad()
        logits = b(x)
        logits.retain_grad()
        ce(y)(logits).backward()
        r = logits.grad.detach()
        opt_b.first_step(zero_grad=True, functional_vjp=True)
        b(x).backward(r)
        opt_b.second_step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
