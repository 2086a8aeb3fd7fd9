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
