"""sharpness_report / quick_sharpness: values, JSON-safety and exact restoration."""

from __future__ import annotations

import json

import pytest
import torch
from sharpness_refs import (
    assert_bitwise_equal,
    dense_refs,
    make_gpt,
    make_mlp,
    rel_err,
    snapshot,
)

from flatlm.sharpness import (
    ALL_FIGURES,
    quick_sharpness,
    sam_decomposition,
    sharpness_report,
)

# torch.func (the dense references, curvlinops) warns about its own use of torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")


def test_full_report_matches_dense_and_restores_everything() -> None:
    model, loss_fn, batches = make_gpt()
    refs = dense_refs("gpt")
    H, G = refs["H"], refs["G"]
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters()]
    snap = snapshot(model)
    rep = sharpness_report(
        model,
        loss_fn,
        batches,
        what=ALL_FIGURES,
        top_k=2,
        trace_samples=30,
        lanczos_tol=1e-10,
        corruption_samples=4,
        sigma=0.01,
    )
    assert_bitwise_equal(model, snap)
    assert all(m.training for m in model.modules())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))
    json.dumps(rep, allow_nan=False)  # plain, finite values only
    assert all(isinstance(v, float | int | str | bool) or v is None for v in rep.values())

    lam, vecs = torch.linalg.eigh(H)
    assert rel_err(rep["hessian.eig_1"], float(lam[-1])) < 1e-8
    assert rel_err(rep["hessian.eig_2"], float(lam[-2])) < 1e-8
    assert rep["hessian.lambda_max"] == rep["hessian.eig_1"]
    assert rel_err(rep["ggn.eig_1"], float(torch.linalg.eigvalsh(G)[-1])) < 1e-8
    assert rel_err(rep["residual.eig_1"], float(torch.linalg.eigvalsh(H - G)[-1])) < 1e-8
    v = vecs[:, -1]
    assert rel_err(rep["hessian.top_rq_ggn"], float(v @ G @ v)) < 1e-8
    assert rel_err(rep["hessian.top_rq_residual"], float(v @ (H - G) @ v)) < 1e-7
    assert rel_err(rep["hessian.top_rq_hessian"], float(lam[-1])) < 1e-8
    assert rep["num_params"] == H.shape[0]
    assert rep["hessian.trace_method"] == "hutch++" and rep["hessian.trace_matvecs"] == 30

    dec = sam_decomposition(model, loss_fn, batches).summary()
    for key, val in dec.items():
        assert rep[f"sam.{key}"] == pytest.approx(val, rel=1e-12, abs=1e-15)
    assert rep["corruption.samples"] == 4 and rep["corruption.mode"] == "elementwise"
    assert rep["corruption.stderr"] > 0


def test_exact_trace_and_sam_sharpness_only() -> None:
    model, loss_fn, batches = make_mlp()
    H = dense_refs("mlp")["H"]
    rep = sharpness_report(
        model, loss_fn, batches, what=("hessian", "sam_sharpness"), trace_samples=10_000
    )
    assert rep["hessian.trace_method"] == "exact"
    assert rel_err(rep["hessian.trace"], float(H.trace())) < 1e-10
    assert rep["hessian.trace_stderr"] == 0.0
    assert "sam.sam_sharpness" in rep and "sam.logit_norm" not in rep
    assert "ggn.eig_1" not in rep


def test_quick_sharpness_fixed_cost() -> None:
    model, loss_fn, batches = make_gpt()
    lam = float(torch.linalg.eigvalsh(dense_refs("gpt")["H"])[-1])
    snap = snapshot(model)
    rep = quick_sharpness(model, loss_fn, batches[:1] + batches[1:], lanczos_iters=12)
    assert_bitwise_equal(model, snap)
    assert rep["hessian.eig_matvecs"] == 12
    assert rep["hessian.lambda_max"] <= lam + 1e-10
    assert rel_err(rep["hessian.lambda_max"], lam) < 0.05
    assert rep["sam.logit_functional_ratio"] > 0
    json.dumps(rep, allow_nan=False)


def test_progress_bar_and_fd_backend(capsys: pytest.CaptureFixture[str]) -> None:
    model, loss_fn, batches = make_mlp()
    rep = sharpness_report(
        model,
        loss_fn,
        batches,
        what=("hessian", "ggn", "corruption"),
        hessian_backend="fd",
        corruption_samples=2,
        progress=True,
    )
    lam = float(torch.linalg.eigvalsh(dense_refs("mlp")["H"])[-1])
    assert rel_err(rep["hessian.eig_1"], lam) < 1e-6
    assert "eigsh[hessian]" in capsys.readouterr().err


def test_rejects_unknown_figures() -> None:
    model, loss_fn, batches = make_mlp()
    with pytest.raises(ValueError, match="unknown figures"):
        sharpness_report(model, loss_fn, batches, what=("hessian", "bogus"))
