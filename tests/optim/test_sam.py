"""SAM and ASAM against closed forms and a hand-written AdamW reference."""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad

from flatlm.optim import SAM
from helpers.optim import SpySGD, ce, make_batch, make_mlp


def test_one_step_on_a_quadratic_equals_the_closed_form():
    # L(θ) = ½ θᵀAθ, so g = Aθ, ε = ρ g/‖g‖ and one SGD step gives θ − lr·A(θ + ε).
    torch.manual_seed(0)
    m = torch.randn(6, 6, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    theta0 = torch.randn(6, dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    rho, lr = 0.3, 0.05
    opt = SAM([theta], torch.optim.SGD, rho=rho, lr=lr)

    loss = opt.step(forward=lambda: theta * 1.0, loss_fn=lambda f: 0.5 * f @ a @ f)

    g = a @ theta0
    eps = rho * g / g.norm()
    expected = theta0 - lr * a @ (theta0 + eps)
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(loss, 0.5 * theta0 @ a @ theta0)


def _adamw_reference(model, x, y, *, steps, rho, lr, betas, eps, wd, adaptive=False, eta=0.01):
    """SAM + AdamW written out by hand with torch.func (float64)."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}

    def loss(params):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    loss_grad = grad(loss)
    for t in range(1, steps + 1):
        g = loss_grad(theta)
        if adaptive:
            tg = {n: (theta[n].abs() + eta) * g[n] for n in names}
            norm = math.sqrt(sum(float((tg[n] ** 2).sum()) for n in names))
            e = {n: rho * (theta[n].abs() + eta) * tg[n] / norm for n in names}
        else:
            norm = math.sqrt(sum(float((g[n] ** 2).sum()) for n in names))
            e = {n: rho * g[n] / norm for n in names}
        gt = loss_grad({n: theta[n] + e[n] for n in names})
        for n in names:
            theta[n] = theta[n] * (1 - lr * wd)
            m[n] = betas[0] * m[n] + (1 - betas[0]) * gt[n]
            v[n] = betas[1] * v[n] + (1 - betas[1]) * gt[n] ** 2
            mhat = m[n] / (1 - betas[0] ** t)
            vhat = v[n] / (1 - betas[1] ** t)
            theta[n] = theta[n] - lr * mhat / (vhat.sqrt() + eps)
    return [theta[n] for n in names]


def test_sam_with_adamw_matches_a_hand_written_reference_over_several_steps():
    x, y = make_batch()
    hp = dict(rho=0.1, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.1)
    model = make_mlp()
    expected = _adamw_reference(make_mlp(), x, y, steps=5, **hp)
    opt = SAM(
        model.parameters(),
        torch.optim.AdamW,
        rho=hp["rho"],
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
    )
    for _ in range(5):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_asam_matches_a_hand_written_reference():
    x, y = make_batch()
    hp = dict(rho=0.5, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.0)
    model = make_mlp()
    expected = _adamw_reference(make_mlp(), x, y, steps=3, adaptive=True, eta=0.05, **hp)
    opt = SAM(model.parameters(), rho=0.5, adaptive=True, eta=0.05, lr=0.01, weight_decay=0.0)
    for _ in range(3):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


def test_the_three_protocols_give_the_same_parameters():
    x, y = make_batch()
    results = []
    for protocol in ("forward", "two_phase", "closure"):
        model = make_mlp()
        opt = SAM(model.parameters(), rho=0.2, lr=0.01)
        for _ in range(3):
            if protocol == "forward":
                opt.step(forward=lambda: model(x), loss_fn=ce(y))
            elif protocol == "two_phase":
                opt.zero_grad()
                ce(y)(model(x)).backward()
                opt.first_step(zero_grad=True)
                ce(y)(model(x)).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.zero_grad()
                ce(y)(model(x)).backward()

                def closure():
                    loss = ce(y)(model(x))
                    loss.backward()
                    return loss

                opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_rho_zero_through_param_groups_is_the_base_optimizer():
    x, y = make_batch()
    model, ref = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), rho=0.3, lr=0.01)
    base = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for group in opt.param_groups:
        group["rho"] = 0.0  # a schedule may do this
    for _ in range(3):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
        base.zero_grad()
        ce(y)(ref(x)).backward()
        base.step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_param_groups_each_use_their_own_rho_with_the_global_norm():
    x, y = make_batch()
    model = make_mlp()
    opt = SAM(
        [
            {"params": model.fc1.parameters(), "rho": 0.1},
            {"params": model.fc2.parameters(), "rho": 0.4},
        ],
        SpySGD,
        lr=0.0,
    )
    ce(y)(model(x)).backward()
    eps = opt.perturbation()
    grads = [p.grad for p in model.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    rhos = [0.1, 0.1, 0.4, 0.4]
    for e, g, rho in zip(eps, grads, rhos, strict=True):
        torch.testing.assert_close(e, rho * g / norm)


def test_max_grad_norm_clips_the_perturbed_gradient_handed_to_the_base():
    x, y = make_batch()
    model, ref = make_mlp(), make_mlp()
    opt = SAM(model.parameters(), SpySGD, rho=0.2, lr=0.1, max_grad_norm=0.05)
    unclipped = SAM(ref.parameters(), SpySGD, rho=0.2, lr=0.1)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    unclipped.step(forward=lambda: ref(x), loss_fn=ce(y))
    raw = unclipped.base_optimizer.seen_grads[0]
    raw_norm = torch.sqrt(sum((g**2).sum() for g in raw))
    assert raw_norm > 0.05
    for g, r in zip(opt.base_optimizer.seen_grads[0], raw, strict=True):
        torch.testing.assert_close(g, r * 0.05 / (raw_norm + 1e-6))
