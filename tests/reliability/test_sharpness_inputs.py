"""``flatlm sharpness``: ``eig_converged`` of a fixed Lanczos budget is the residual test, not
a constant; counts that cannot make a report and a device that is not there are one-line
errors naming the flag (exit code 2) before anything is loaded."""

from __future__ import annotations

import json

import pytest
import torch

from flatlm import cli
from flatlm.lm.train import train
from flatlm.sharpness import hessian_operator, lanczos
from sharpness.sharpness_refs import dense_refs, make_gpt, make_mlp


def test_the_lanczos_residual_is_the_true_one_and_decides_convergence():
    model, loss_fn, batches = make_gpt()
    op = hessian_operator(model, loss_fn, batches)
    lam = float(torch.linalg.eigvalsh(dense_refs("gpt")["H"])[-1])
    for iters in (3, 10):
        res = lanczos(op, iters, k=2, return_vectors=True)
        assert res.converged is False, (iters, res.residuals)
        for i, theta in enumerate(res.eigenvalues):  # |β_m s_m| = ||H y - θ y||, measured
            y = res.eigenvectors[:, i].double()
            true = float((op.matvec(y) - theta * y).norm())
            assert abs(res.residuals[i] - true) <= 1e-8 * abs(lam) + 1e-6 * true
    assert lanczos(op, 3).residuals[0] > 1e-3 * lam  # three products are far from converged
    model, loss_fn, batches = make_mlp()
    small = hessian_operator(model, loss_fn, batches, params="fc2.bias")  # dim 3: spanned
    res = lanczos(small, 3, k=3)
    assert res.converged is True and max(res.residuals) == 0.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    from flatlm.lm.config import load_config
    from lm.conftest import TINY

    out = tmp_path_factory.mktemp("sharpness") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLATLM_CACHE", str(out.parent / "cache"))
        cfg = load_config(overrides={**TINY, "data.corpus": str(corpus_file)})
        train(cfg, out, quiet=True)
    return out


def test_a_short_lanczos_budget_is_recorded_as_not_converged(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("FLATLM_CACHE", str(trained.parent / "cache"))
    out = tmp_path / "s.json"
    argv = ["sharpness", str(trained), "--what", "hessian", "--batches", "1", "--out", str(out)]
    assert cli.main([*argv, "--lanczos-iters", "3"]) == 0
    report = json.loads(out.read_text())["figures"]["val"]
    assert report["hessian.eig_converged"] is False and report["hessian.eig_residual"] > 0
    # A subset small enough for the budget to span it: converged, residual ~0.
    assert cli.main([*argv, "--lanczos-iters", "80", "--params", "ln_f.bias"]) == 0
    report = json.loads(out.read_text())["figures"]["val"]
    assert report["hessian.eig_converged"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--top-k", "-2"], "--top-k must be >= 1, got -2"),
        (["--lanczos-iters", "0"], "--lanczos-iters must be >= 1, got 0"),
        (["--lanczos-iters", "-1"], "--lanczos-iters must be >= 1, got -1"),
        (["--trace-samples", "-1"], "--trace-samples must be >= 0, got -1"),
        (["--batches", "0"], "--batches must be >= 1, got 0"),
    ],
)
def test_a_count_that_cannot_make_a_report_is_refused(args, message, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert cli.main(["sharpness", str(tmp_path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"flatlm sharpness: error: {message}\n"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["sharpness", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatlm sharpness: error: --device is 'cuda' but torch sees no CUDA")
    assert err.count("\n") == 1 and "use --device cpu" in err


def test_more_windows_than_the_split_holds_are_refused(trained, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FLATLM_CACHE", str(trained.parent / "cache"))
    out = tmp_path / "new" / "folder" / "s.json"  # made, as asked
    argv = ["sharpness", str(trained), "--what", "hessian", "--lanczos-iters", "2"]
    assert cli.main([*argv, "--batches", "100000000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatlm sharpness: error: --batches 100000000 asks for 400000000 ")
    assert "window positions; use --batches" in err and err.count("\n") == 1
    assert cli.main([*argv, "--batches", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["figures"]["val"]["hessian.eig_matvecs"] == 2
