"""Random-corruption sharpness: bookkeeping by hand and the second-order expectation."""

from __future__ import annotations

import math

import pytest
import torch
from sharpness_refs import (
    assert_bitwise_equal,
    dense_loss_fn,
    dense_refs,
    make_gpt,
    make_mlp,
    snapshot,
)

from flatlm.sharpness import corruption_sharpness

# torch.func (the dense references, curvlinops) warns about its own use of torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def test_matches_hand_computation_with_same_draws() -> None:
    model, loss_fn, batches = make_mlp()
    sigma, n = 0.05, 3
    est = corruption_sharpness(model, loss_fn, batches, sigma=sigma, num_samples=n, seed=5)
    theta0, f = dense_loss_fn(model, loss_fn, batches)
    gen = torch.Generator().manual_seed(5)
    incs = []
    for _ in range(n):
        z = torch.cat(
            [
                torch.randn(p.shape, generator=gen, dtype=torch.float64).reshape(-1)
                for p in model.parameters()
            ]
        )
        incs.append(float(f(theta0 + sigma * theta0.abs() * z) - f(theta0)))
    t = torch.tensor(incs, dtype=torch.float64)
    assert abs(est.mean_increase - float(t.mean())) < 1e-14
    assert abs(est.stderr - float(t.std() / math.sqrt(n))) < 1e-14
    assert est.num_samples == n and est.mode == "elementwise"


def test_antithetic_mean_matches_second_order_expectation() -> None:
    """E[L(θ+ε)+L(θ−ε)]/2 − L(θ) = ½E[εᵀHε] + O(σ⁴): ½σ²Σθ_i²H_ii (elementwise) and
    ½s²tr(H) with s = σ‖θ‖/√n (isotropic). Fixed seed; 4 standard errors."""
    model, loss_fn, batches = make_gpt()
    H = dense_refs("gpt")["H"]
    theta0, _ = dense_loss_fn(model, loss_fn, batches)
    sigma = 1e-3
    preds = {
        "elementwise": 0.5 * sigma**2 * float((theta0**2 * H.diag()).sum()),
        "isotropic": 0.5 * (sigma * float(theta0.norm())) ** 2 / theta0.numel() * float(H.trace()),
    }
    for mode, pred in preds.items():
        snap = snapshot(model)
        est = corruption_sharpness(
            model,
            loss_fn,
            batches,
            sigma=sigma,
            num_samples=200,
            mode=mode,
            antithetic=True,
            seed=0,
        )
        assert_bitwise_equal(model, snap)
        assert abs(est.mean_increase - pred) < 4 * est.stderr + 1e-3 * abs(pred), mode


def test_zero_sigma_and_summary_is_plain() -> None:
    model, loss_fn, batches = make_mlp()
    est = corruption_sharpness(model, loss_fn, batches, sigma=0.0, num_samples=2)
    assert est.mean_increase == 0.0 and est.stderr == 0.0
    s = est.summary()
    assert all(isinstance(v, float | int | str) for v in s.values())
