"""ρ schedules in the workbench: the config key and spec option, resume mid-window, the cost."""

from __future__ import annotations

import json

import pytest
import torch

import flatlm.lm.train as train_mod
from flatlm.lm.checkpoint import CheckpointError
from flatlm.lm.compare import compare
from flatlm.lm.config import ConfigError, load_config, rho_schedule
from flatlm.lm.report import run_dir, write_report
from flatlm.lm.train import step_cost, train
from flatlm.optim import create


def _rho_per_step(monkeypatch) -> list[float]:
    """The ρ each training step of the next run starts with."""
    seen: list[float] = []
    real_step = train_mod.train_step

    def spy(model, opt, *args, **kwargs):
        seen.append(opt.param_groups[0]["rho"])
        return real_step(model, opt, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", spy)
    return seen


def test_window_sets_rho_per_step_and_resume_mid_window_is_bit_exact(
    tiny_cfg, tmp_path, monkeypatch
):
    cfg = tiny_cfg(optim__method="sam:rho=0.5,rho_schedule=window:0.25:0.75", train__steps=8)
    seen = _rho_per_step(monkeypatch)
    straight = train(cfg, tmp_path / "a", quiet=True)
    assert seen == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]  # steps 2..5 of 8
    seen.clear()
    part = train(cfg, tmp_path / "b", quiet=True, stop_after=4)  # inside the window
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["rho_scheduler"]["last_step"] == 4 and part["step"] == 4
    resumed = train(cfg, tmp_path / "b", quiet=True, resume=True)
    assert seen == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]  # 4 steps, then the other 4
    a, b = (
        torch.load(p / "checkpoint.pt", weights_only=True)["model"]
        for p in (tmp_path / "a", tmp_path / "b")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed["val_loss"], resumed["test_loss"]) == (
        straight["val_loss"],
        straight["test_loss"],
    )
    assert straight["rho_schedule"] == "window:0.25:0.75"
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["optim"]["method"] == "sam:rho=0.5,rho_schedule=window:0.25:0.75"


def test_gsam_rho_follows_the_learning_rate_and_resumes_bit_exact(tiny_cfg, tmp_path, monkeypatch):
    # rho_schedule=lr: ρ_k = ρ·lr_k/lr_max with the LR the step runs with (GSAM's rule).
    cfg = tiny_cfg(optim__method="gsam:rho=0.5,rho_schedule=lr", train__steps=6)
    seen: list[tuple[float, float]] = []
    real_step = train_mod.train_step

    def spy(model, opt, *args, **kwargs):
        group = opt.param_groups[0]
        seen.append((group["rho"], group["lr"] / group["initial_lr"]))
        return real_step(model, opt, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", spy)
    train(cfg, tmp_path / "a", quiet=True)
    assert len({lr for _, lr in seen}) > 2  # the LR moved
    assert [rho for rho, _ in seen] == pytest.approx([0.5 * lr for _, lr in seen], rel=1e-12)
    first = list(seen)
    seen.clear()
    train(cfg, tmp_path / "b", quiet=True, stop_after=3)
    train(cfg, tmp_path / "b", quiet=True, resume=True)
    assert seen == first
    a, b = (
        torch.load(p / "checkpoint.pt", weights_only=True)["model"]
        for p in (tmp_path / "a", tmp_path / "b")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_config_key_applies_and_a_changed_schedule_is_refused_on_resume(
    tiny_cfg, tmp_path, monkeypatch
):
    cfg = tiny_cfg(optim__method="sam", optim__rho=0.3, optim__rho_schedule="window:0s:2s")
    seen = _rho_per_step(monkeypatch)
    train(cfg, tmp_path, quiet=True, stop_after=3)
    assert seen == [0.3, 0.3, 0.0]
    assert (
        json.loads((tmp_path / "config.json").read_text())["optim"]["rho_schedule"]
        == "window:0s:2s"
    )
    other = tiny_cfg(optim__method="sam", optim__rho=0.3, optim__rho_schedule="window:0s:4s")
    with pytest.raises(CheckpointError, match=r"optim\.rho_schedule is 'window:0s:2s'"):
        train(other, tmp_path, quiet=True, resume=True)


def test_precedence_and_adamw(tiny_cfg):
    cfg = tiny_cfg(
        optim__method="sam:rho_schedule=linear:0:0.5", optim__rho_schedule="window:0:0.5"
    )
    assert rho_schedule(cfg.optim) == "linear:0:0.5"  # the spec's option wins
    cfg = tiny_cfg(optim__method="adamw", optim__rho_schedule="window:0:0.5")
    assert rho_schedule(cfg.optim) == "constant"  # as optim.rho, ignored by AdamW
    assert (
        train_mod.make_optimizer(torch.nn.Linear(2, 2), cfg.optim, 1.0).__class__
        is torch.optim.AdamW
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optim.rho_schedule": "window:0.5:0.1"}, r"'optim\.rho_schedule'.*must be before end"),
        ({"optim.rho_schedule": "windw:0:1"}, r"'optim\.rho_schedule'.*unknown ρ schedule 'windw'"),
        (
            {"optim.method": "sam:rho_schedule=window:0:1.5"},
            r"'optim\.method'.*must be in \[0, 1\]",
        ),
        (
            {"optim.method": "adamw:rho_schedule=window:0:0.5"},
            r"adamw has no option 'rho_schedule'",
        ),
    ],
)
def test_bad_schedules_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_create_refuses_a_schedule_it_cannot_apply():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="build_rho_schedule"):
        create("sam:rho_schedule=window:0:0.1", p)
    create("sam:rho_schedule=constant", p)  # constant is no schedule: nothing to refuse


def test_compare_names_folders_readably_and_records_the_cost(tiny_cfg, tmp_path):
    spec = "sam:rho=0.5,rho_schedule=window:0:0.5"
    cfg = tiny_cfg(train__steps=4)
    compare(cfg, tmp_path, ["adamw", spec], [0], quiet=True)
    folder = run_dir(tmp_path, spec, 0)
    assert folder.name == "sam_rho=0.5_rho_schedule=window_0_0.5-s0"
    result = json.loads((folder / "result.json").read_text())
    assert result["rho_schedule"] == "window:0:0.5"
    adamw = json.loads((run_dir(tmp_path, "adamw", 0) / "result.json").read_text())
    assert adamw["step_counts"] == {"fresh": 0, "reuse": 0, "plain": 4}
    assert adamw["passes_per_step"] == 1.0
    table = write_report(tmp_path)["table"]
    assert "| adamw | constant | 0 | 0 | 4 | 1.000 |" in table
    # ρ = 0.5 for the first half of the 4 steps, 0 after: 0 in every group is a plain step
    assert result["step_counts"] == {"fresh": 2, "reuse": 0, "plain": 2}
    assert result["passes_per_step"] == 1.5
    assert f"| {spec} | window:0:0.5 | 2 | 0 | 2 | 1.500 |" in table


def test_step_cost_from_the_optimizers_counts():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    opt.step_counts = {"fresh": 3, "reuse": 2, "plain": 5}  # type: ignore[attr-defined]
    assert step_cost(opt, 10) == {
        "step_counts": {"fresh": 3, "reuse": 2, "plain": 5},
        "passes_per_step": 1.3,
    }
    sam = create("sam", [torch.zeros(1, requires_grad=True)])
    assert step_cost(sam, 0) == {
        "step_counts": {"fresh": 0, "reuse": 0, "plain": 0},
        "passes_per_step": 0.0,
    }
