"""ASAM as Kwon et al. (2021) published it, against a step computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from flatlm.optim import ASAM, create, default_rho
from helpers.optim import SpySGD


class NormNet(nn.Module):
    """Weights (2-D), biases and a LayerNorm gain: the tensors ASAM treats differently."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,))


def _hand_asam_grad(model, x, y, rho, eta, is_weight):
    """T = |w| + η on the weights, 1 elsewhere; ε = ρ T²g/‖Tg‖; ∇L(θ+ε) by torch.func."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    g = grad(loss)(theta)
    t = {n: (v.abs() + eta) if is_weight(n, v) else torch.ones_like(v) for n, v in theta.items()}
    norm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in theta))
    eps = {n: rho * t[n] ** 2 * g[n] / norm for n in theta}
    return eps, grad(loss)({n: theta[n] + eps[n] for n in theta})


@pytest.mark.parametrize("use_name", [False, True])
def test_asam_step_equals_the_hand_computed_one(use_name):
    torch.manual_seed(0)
    model = NormNet().double()
    x, y = _data()
    if use_name:
        opt = create("asam", model.parameters(), base_optimizer=SpySGD, lr=0.1)
    else:
        opt = ASAM(model.parameters(), SpySGD, lr=0.1)
    assert opt.param_groups[0]["rho"] == 0.5 and default_rho("asam") == 0.5  # ASAM's own ρ

    eps, want = _hand_asam_grad(model, x, y, 0.5, 0.01, lambda n, v: v.dim() >= 2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for (n, _), e in zip(model.named_parameters(), opt.perturbation(), strict=True):
        torch.testing.assert_close(e, eps[n], rtol=1e-12, atol=1e-15)
    opt.step(forward=lambda: model(x), loss_fn=lambda z: F.cross_entropy(z, y))
    for (n, _), g in zip(model.named_parameters(), opt.base_optimizer.seen_grads[0], strict=True):
        torch.testing.assert_close(g, want[n], rtol=1e-12, atol=1e-14)


def test_biases_and_norm_gains_are_not_scaled_but_a_predicate_can_say_otherwise():
    torch.manual_seed(0)
    model = NormNet().double()
    x, y = _data()
    # The reference code's rule ('weight' in the parameter's name) also scales the LayerNorm gain.
    by_name = {p: "weight" in n for n, p in model.named_parameters()}
    opt = ASAM(model.parameters(), SpySGD, rho=0.3, eta=0.05, lr=0.1, is_weight=by_name.__getitem__)
    eps, _ = _hand_asam_grad(model, x, y, 0.3, 0.05, lambda n, v: "weight" in n)
    default_eps, _ = _hand_asam_grad(model, x, y, 0.3, 0.05, lambda n, v: v.dim() >= 2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    got = dict(zip([n for n, _ in model.named_parameters()], opt.perturbation(), strict=True))
    for n, e in got.items():
        torch.testing.assert_close(e, eps[n], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(got["norm.weight"], default_eps["norm.weight"])


def test_sam_adaptive_keeps_scaling_every_tensor():
    # flatlm's earlier variant stays available as SAM(adaptive=True): T = |θ| + η everywhere.
    torch.manual_seed(0)
    model = NormNet().double()
    x, y = _data()
    opt = create("sam:adaptive=true", model.parameters(), base_optimizer=SpySGD, rho=0.5, lr=0.1)
    eps, _ = _hand_asam_grad(model, x, y, 0.5, 0.01, lambda n, v: True)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for (n, _), e in zip(model.named_parameters(), opt.perturbation(), strict=True):
        torch.testing.assert_close(e, eps[n], rtol=1e-12, atol=1e-15)
