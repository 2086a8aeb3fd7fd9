"""``train.compile``: a compiled run trains as the eager one, resumes, checkpoints the plain
module's keys, and compiles nothing after its first step (docs/compile.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flatlm.lm.train as train_mod
from flatlm.lm.checkpoint import load_trained
from flatlm.optim.compile import CompileCounts, _cxx_compiler, compile_counts

needs_cxx = pytest.mark.skipif(
    _cxx_compiler() is None, reason="Inductor on CPU needs a C++ compiler"
)


def _losses(run_dir: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records if r["split"] != "sharpness"]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[CompileCounts, bool]]:
    """Dynamo's counts after every training step, and whether the stepped model was compiled."""
    seen: list[tuple[CompileCounts, bool]] = []
    real = train_mod.train_step

    def step(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        seen.append((compile_counts(), getattr(model, "_compiled_call_impl", None) is not None))
        return loss

    monkeypatch.setattr(train_mod, "train_step", step)
    return seen


def _no_compile_after_the_first_step(seen: list[tuple[CompileCounts, bool]]) -> None:
    assert all(compiled for _, compiled in seen)
    # step 0's validation compiled the eval graph, step 1 the training graph; the later
    # validations, the sharpness diagnostics (eager), the test loss and the regime figures
    # compile nothing more
    assert [c for c, _ in seen] == [seen[0][0]] * len(seen)
    assert compile_counts() == seen[0][0]


@pytest.mark.slow  # Inductor's first compile of the micro GPT: ~18 s on a 2-core CPU
@needs_cxx
def test_a_compiled_run_trains_as_the_eager_one_and_resumes(tiny_cfg, tmp_path, counted):
    # sharpness_every: the Hessian-vector products (double backward) run the forward eagerly
    eager = tiny_cfg(train__sharpness_every=3)
    compiled = tiny_cfg(train__sharpness_every=3, train__compile=True)
    train_mod.train(eager, tmp_path / "eager", quiet=True)
    assert not any(c for _, c in counted)
    counted.clear()
    straight = train_mod.train(compiled, tmp_path / "compiled", quiet=True)
    assert straight["status"] == "completed"
    _no_compile_after_the_first_step(counted)

    # Same losses within float32 reordering: Inductor fuses and reorders the sums (no dropout
    # here, whose masks under Inductor are not eager PyTorch's). Measured: at most 5e-7 apart
    # (2 ulps at a loss of 4); 1e-5 relative is ~20 ulps, far below any real change (one step
    # moves the loss by ~1e-2).
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert [(s, split) for s, split, _ in a] == [(s, split) for s, split, _ in b]
    for (step, split, x), (_, _, y) in zip(a, b, strict=True):
        assert y == pytest.approx(x, rel=1e-5), (step, split)

    # The checkpoint holds the plain module's keys (compiled in place: no "_orig_mod." prefix)
    # and loads into an uncompiled model.
    keys = list(_params(tmp_path / "compiled"))
    assert keys == list(_params(tmp_path / "eager"))
    assert not any("_orig_mod" in k for k in keys)
    model, *_ = load_trained(tmp_path / "compiled")
    assert getattr(model, "_compiled_call_impl", None) is None

    # Interrupted and resumed in a new model: the same run (the same kernels on one thread).
    counted.clear()
    part = train_mod.train(compiled, tmp_path / "resumed", quiet=True, stop_after=3)
    assert part["status"] == "stopped"
    counted.clear()
    train_mod.train(compiled, tmp_path / "resumed", quiet=True, resume=True)
    assert len(counted) == 3
    _no_compile_after_the_first_step(counted)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "compiled")
    for key, value in _params(tmp_path / "compiled").items():
        assert torch.equal(_params(tmp_path / "resumed")[key], value), key


def test_compile_may_not_change_on_resume(tiny_cfg, tmp_path):
    from flatlm.lm.checkpoint import CheckpointError

    train_mod.train(tiny_cfg(), tmp_path, quiet=True, stop_after=2)
    with pytest.raises(
        CheckpointError, match=r"train\.compile is False in the checkpoint but True"
    ):
        train_mod.train(tiny_cfg(train__compile=True), tmp_path, quiet=True, resume=True)
