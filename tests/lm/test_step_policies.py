"""Step policies in the workbench: a policy that moves over training takes the run's length."""

from __future__ import annotations

import pytest

import flatlm.lm.train as train_mod
from flatlm.lm.train import train

REAL_STEP = train_mod.train_step


def _schedule_per_step(monkeypatch, value) -> list:
    """``value(policy)`` as each training step of the next run starts."""
    seen: list = []

    def spy(model, opt, *args, **kwargs):
        seen.append((opt.policy.total_steps, value(opt.policy)))
        return REAL_STEP(model, opt, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", spy)
    return seen


def test_aesam_takes_total_steps_from_train_steps(tiny_cfg, tmp_path, monkeypatch):
    steps = 8
    seen = _schedule_per_step(monkeypatch, lambda policy: policy.threshold())
    result = train(
        tiny_cfg(optim__method="sam:policy=aesam", train__steps=steps), tmp_path, quiet=True
    )
    assert result["step"] == steps
    assert {total for total, _ in seen} == {steps}
    # c_t from +1 at t = 0 to −1 at t = train.steps, linearly: c_t = 1 − 2t/T.
    expected = [1.0 - 2.0 * t / steps for t in range(steps)]
    assert [c for _, c in seen] == pytest.approx(expected, abs=1e-12)
    counts = result["step_counts"]
    assert counts["fresh"] + counts["plain"] == steps and counts["reuse"] == 0


def test_a_spec_total_steps_wins_and_rst_takes_the_length_only_to_move_p(
    tiny_cfg, tmp_path, monkeypatch
):
    seen = _schedule_per_step(monkeypatch, lambda policy: policy.threshold())
    train(tiny_cfg(optim__method="sam:policy=aesam,total_steps=100"), tmp_path / "a", quiet=True)
    assert {total for total, _ in seen} == {100}
    seen = _schedule_per_step(monkeypatch, lambda policy: policy.probability())
    cfg = tiny_cfg(optim__method="sam:policy=rst,rst_p=1,rst_p_end=0", train__steps=6)
    train(cfg, tmp_path / "b", quiet=True)
    assert {total for total, _ in seen} == {6}
    assert [p for _, p in seen] == pytest.approx([1.0 - t / 6 for t in range(6)], abs=1e-12)
    seen = _schedule_per_step(monkeypatch, lambda policy: policy.probability())
    train(tiny_cfg(optim__method="sam:policy=rst,rst_p=0.5"), tmp_path / "c", quiet=True)
    assert {total for total, _ in seen} == {None}  # a constant p needs no length: none filled
