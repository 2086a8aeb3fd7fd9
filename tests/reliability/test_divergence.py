"""Item 4: a run that diverged ends as "diverged", with a reason and exit code 3: never
"completed"."""

from __future__ import annotations

import json
import math

import pytest

from flatlm import cli
from flatlm.lm.train import _divergence, train

pytestmark = pytest.mark.filterwarnings("ignore::flatlm.optim.NonFiniteStepWarning")


@pytest.mark.parametrize("method", ["adamw", "sam"])
def test_a_run_at_a_huge_learning_rate_is_diverged_not_completed(tiny_cfg, tmp_path, method):
    result = train(tiny_cfg(optim__method=method, optim__lr=1e30), tmp_path, quiet=True)
    assert result["status"] == "diverged"
    assert "non-finite final val_loss" in result["reason"]
    if method == "sam":  # it skips the non-finite steps: most of them
        assert "steps skipped for a non-finite loss or gradient" in result["reason"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert (saved["status"], saved["reason"]) == (result["status"], result["reason"])
    assert math.isnan(saved["val_loss"]) and "final_sharpness" not in saved


def test_most_steps_skipped_is_diverged_even_with_finite_losses():
    finite = {"val_loss": 3.0, "test_loss": 3.1, "train_loss": 2.9, "step": 10}
    assert _divergence(finite | {"skipped_steps": 6}) == (
        "6 of 10 steps skipped for a non-finite loss or gradient"
    )
    assert _divergence(finite | {"skipped_steps": 5}) == ""  # half is not most
    assert _divergence(finite | {"test_loss": math.inf, "skipped_steps": 0}) == (
        "non-finite final test_loss"
    )


def test_a_healthy_run_is_completed_with_an_empty_reason(tiny_cfg, tmp_path):
    result = train(tiny_cfg(), tmp_path, quiet=True)
    assert (result["status"], result["reason"]) == ("completed", "")


def test_the_cli_exits_3_with_a_line_naming_the_divergence(tiny_argv, tmp_path, capsys):
    assert cli.main(tiny_argv(tmp_path, "--set", "optim.lr=1e30")) == 3
    err = capsys.readouterr().err
    assert "diverged: non-finite final val_loss" in err and err.count("\n") == 1


def test_skipped_steps_are_counted_across_a_resume(tiny_cfg, tmp_path, monkeypatch):
    # SAM over 6 steps with NaN logits at steps 1, 2 (before a stop after step 3) and 4, 5
    # (after the resume): 4 of 6 steps skipped, counted here, so the run is diverged although
    # its final losses are finite. Losing the first half's count on resume would say
    # "completed" with 2 skipped.
    import flatlm.lm.train as train_mod

    real_step, calls = train_mod.train_step, []

    def step_with_nan_logits(model, *args, **kwargs):
        calls.append(1)
        if len(calls) not in (1, 2, 4, 5):
            return real_step(model, *args, **kwargs)
        hook = model.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        try:
            return real_step(model, *args, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(train_mod, "train_step", step_with_nan_logits)
    cfg = tiny_cfg(optim__method="sam")
    part = train(cfg, tmp_path, quiet=True, stop_after=3)
    assert (part["status"], part["skipped_steps"]) == ("stopped", 2)
    result = train(cfg, tmp_path, quiet=True, resume=True)
    assert len(calls) == 6 and result["step"] == 6
    assert result["skipped_steps"] == 4
    assert math.isfinite(result["val_loss"]) and math.isfinite(result["test_loss"])
    assert result["status"] == "diverged"
    assert result["reason"] == "4 of 6 steps skipped for a non-finite loss or gradient"
