"""SAM decomposition, SAM-sharpness and the optimizer hook, against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
from sharpness_refs import (
    CASES,
    assert_bitwise_equal,
    dense_loss_fn,
    make_gpt,
    make_linear,
    make_mlp,
    rel_err,
    snapshot,
)
from torch import Tensor

import flatlm.optim
from flatlm.sharpness import sam_decomposition, sam_epsilon, sam_sharpness

# torch.func (the dense references, curvlinops) warns about its own use of torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _plain_sam_epsilon(grads: list[Tensor], rho: float) -> list[Tensor]:
    """ρ g/‖g‖ in plain torch (the global L2 norm over all tensors), independent of flatlm."""
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return [rho * g / norm for g in grads]


def test_sam_epsilon_equals_plain_torch() -> None:
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(4, 3), (5,)]]
    for got, want in zip(sam_epsilon(grads, 0.3), _plain_sam_epsilon(grads, 0.3), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert float(torch.sqrt(sum((e * e).sum() for e in sam_epsilon(grads, 0.3)))) == (
        pytest.approx(0.3, rel=1e-14)
    )
    zeros = sam_epsilon([torch.zeros(3), torch.zeros(2, 2)], 0.3)  # g = 0: ε = 0, not NaN
    assert all(torch.equal(e, torch.zeros_like(e)) for e in zeros)


def test_paths_add_up_to_sam_gradient_and_match_hand_computation() -> None:
    for name in ("mlp", "gpt"):
        model, loss_fn, batches = CASES[name]()
        rho = 0.1
        dec = sam_decomposition(model, loss_fn, batches, rho=rho)
        total = _cat(dec.functional) + _cat(dec.logit)
        sam = _cat(dec.sam_grad)
        assert torch.allclose(total, sam, rtol=1e-12, atol=1e-14), name
        # independent reference: torch.func gradient of the mean loss at θ and at θ + ρ g/‖g‖
        theta0, f = dense_loss_fn(model, loss_fn, batches)
        g = torch.func.grad(f)(theta0)
        assert torch.allclose(_cat(dec.grad), g, rtol=1e-12, atol=1e-14)
        theta1 = theta0 + rho * g / g.norm()
        assert torch.allclose(sam, torch.func.grad(f)(theta1), rtol=1e-10, atol=1e-13)
        assert rel_err(dec.loss, float(f(theta0))) < 1e-12
        assert rel_err(dec.loss_perturbed, float(f(theta1))) < 1e-12
        s = dec.summary()
        assert rel_err(s["eps_norm"], rho) < 1e-12
        assert s["logit_functional_ratio"] == s["logit_norm"] / s["functional_norm"]
        cos_f = float(sam @ _cat(dec.functional) / (sam.norm() * _cat(dec.functional).norm()))
        assert abs(s["cos_sam_functional"] - cos_f) < 1e-12


def test_linear_model_functional_path_is_clean_gradient() -> None:
    model, loss_fn, batches = make_linear()
    dec = sam_decomposition(model, loss_fn, batches, rho=0.5)
    assert torch.allclose(_cat(dec.functional), _cat(dec.grad), rtol=1e-13, atol=1e-15)
    # and the logit path carries all of SAM's change
    assert torch.allclose(_cat(dec.logit), _cat(dec.sam_grad) - _cat(dec.grad), atol=1e-14)
    assert dec.summary()["logit_norm"] > 0


def test_zero_rho_has_no_logit_path() -> None:
    model, loss_fn, batches = make_mlp()
    dec = sam_decomposition(model, loss_fn, batches, rho=0.0)
    assert float(_cat(dec.logit).abs().max()) == 0.0
    assert torch.equal(_cat(dec.functional), _cat(dec.sam_grad))


def test_sam_sharpness_equals_hand_computation() -> None:
    model, loss_fn, batches = make_gpt()
    rho = 0.05
    params = [p for p in model.parameters()]
    # by hand, plain autograd: L(θ), g, then L(θ + ρ g/‖g‖) on a deep copy
    total = sum(y.numel() for _, y in batches)
    loss = sum(loss_fn(model(x), y) * y.numel() / total for x, y in batches)
    grads = torch.autograd.grad(loss, params)
    gn = torch.sqrt(sum((g**2).sum() for g in grads))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(twin.parameters(), grads, strict=True):
            p.add_(rho * g / gn)
        loss1 = sum(loss_fn(twin(x), y) * y.numel() / total for x, y in batches)
    snap = snapshot(model)
    out = sam_sharpness(model, loss_fn, batches, rho=rho)
    assert_bitwise_equal(model, snap)
    assert abs(out["sam_sharpness"] - float(loss1 - loss.detach())) < 1e-13
    assert rel_err(out["loss"], float(loss.detach())) < 1e-13
    assert rel_err(out["eps_norm"], rho) < 1e-12


def test_explicit_eps_and_subset() -> None:
    model, loss_fn, batches = make_mlp()
    sel = ["fc2.*"]
    eps = [0.01 * torch.ones_like(model.fc2.weight), None]  # fc2.bias not perturbed
    dec = sam_decomposition(model, loss_fn, batches, params=sel, eps=eps)
    assert dec.param_names == ["fc2.weight", "fc2.bias"]
    names = dec.param_names
    theta0, f = dense_loss_fn(model, loss_fn, batches, names)
    shift = torch.cat([eps[0].reshape(-1), torch.zeros(model.fc2.bias.numel())]).double()
    assert torch.allclose(_cat(dec.sam_grad), torch.func.grad(f)(theta0 + shift), atol=1e-13)
    out = sam_sharpness(model, loss_fn, batches, params=sel, eps=eps)
    assert abs(out["sam_sharpness"] - float(f(theta0 + shift) - f(theta0))) < 1e-13


class _FakeSamOptimizer:
    """Duck-typed stand-in for flatlm's SharpnessAwareOptimizer: ε = ρ g/‖g‖ from p.grad, built
    in plain torch (not with ``sam_epsilon``, which is under test here)."""

    def __init__(self, params: list[torch.nn.Parameter], rho: float) -> None:
        self.param_groups = [{"params": params}]
        self.rho = rho
        self.calls = 0

    def perturbation(self) -> list[Tensor | None]:
        self.calls += 1
        ps = self.param_groups[0]["params"]
        return _plain_sam_epsilon([p.grad for p in ps], self.rho)


class _FakeSignOptimizer(_FakeSamOptimizer):
    """A direction no rho-based default would produce: ε = ρ sign(g)/√n (n elements)."""

    def perturbation(self) -> list[Tensor | None]:
        self.calls += 1
        ps = self.param_groups[0]["params"]
        n = sum(p.numel() for p in ps)
        return [self.rho * p.grad.sign() / n**0.5 for p in ps]


def test_optimizer_perturbation_is_used_and_grads_restored() -> None:
    model, loss_fn, batches = make_mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # a stale gradient the user still holds
    grads_before = [p.grad for p in model.parameters()]
    opt = _FakeSamOptimizer(list(model.parameters()), rho=0.07)
    snap = snapshot(model)
    via_opt = sam_decomposition(model, loss_fn, batches, optimizer=opt)
    assert opt.calls == 1
    assert_bitwise_equal(model, snap)
    for p, g in zip(model.parameters(), grads_before, strict=True):
        assert p.grad is g and bool((g == 7.0).all())
    # independent reference: torch.func gradient at θ + ρ g/‖g‖, g the clean dense gradient
    theta0, f = dense_loss_fn(model, loss_fn, batches)
    g = torch.func.grad(f)(theta0)
    theta1 = theta0 + 0.07 * g / g.norm()
    assert torch.allclose(
        _cat(via_opt.sam_grad), torch.func.grad(f)(theta1), rtol=1e-10, atol=1e-13
    )
    assert torch.allclose(_cat(via_opt.epsilon), theta1 - theta0, rtol=1e-12, atol=1e-15)
    direct = sam_decomposition(model, loss_fn, batches, rho=0.07)
    assert torch.allclose(_cat(via_opt.sam_grad), _cat(direct.sam_grad), rtol=1e-13, atol=1e-15)
    out = sam_sharpness(model, loss_fn, batches, optimizer=opt)
    assert abs(out["sam_sharpness"] - float(f(theta1) - f(theta0))) < 1e-13
    assert abs(out["sam_sharpness"] - (direct.loss_perturbed - direct.loss)) < 1e-14


def test_a_non_sam_optimizer_direction_is_used_verbatim() -> None:
    model, loss_fn, batches = make_gpt()
    opt = _FakeSignOptimizer(list(model.parameters()), rho=0.05)
    dec = sam_decomposition(model, loss_fn, batches, optimizer=opt)
    theta0, f = dense_loss_fn(model, loss_fn, batches)
    shift = 0.05 * torch.func.grad(f)(theta0).sign() / theta0.numel() ** 0.5
    assert torch.equal(_cat(dec.epsilon), shift)
    assert torch.allclose(_cat(dec.sam_grad), torch.func.grad(f)(theta0 + shift), rtol=1e-10)
    out = sam_sharpness(model, loss_fn, batches, optimizer=opt)
    assert abs(out["sam_sharpness"] - float(f(theta0 + shift) - f(theta0))) < 1e-13


def test_train_mode_and_params_restored_bitwise() -> None:
    model, loss_fn, batches = make_gpt()
    model.train()
    snap = snapshot(model)
    sam_decomposition(model, loss_fn, batches, rho=0.3)
    sam_sharpness(model, loss_fn, batches, rho=0.3)
    assert_bitwise_equal(model, snap)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_real_flatlm_sam_optimizer() -> None:
    """Integration with flatlm.optim (no skip: a renamed API must fail): SAM's ε is ρ g/‖g‖
    (ρ = 0.07, not the measuring functions' default 0.05, so the optimizer's ε must be used)."""
    model, loss_fn, batches = make_mlp()
    opt = flatlm.optim.SAM(model.parameters(), torch.optim.AdamW, rho=0.07, lr=1e-3)
    snap = snapshot(model)
    via_opt = sam_sharpness(model, loss_fn, batches, optimizer=opt)
    assert_bitwise_equal(model, snap)
    theta0, f = dense_loss_fn(model, loss_fn, batches)
    g = torch.func.grad(f)(theta0)
    want = float(f(theta0 + 0.07 * g / g.norm()) - f(theta0))
    assert via_opt["sam_sharpness"] == pytest.approx(want, rel=1e-10)
    dec = sam_decomposition(model, loss_fn, batches, optimizer=opt)
    assert torch.allclose(_cat(dec.epsilon), 0.07 * g / g.norm(), rtol=1e-12, atol=1e-15)
