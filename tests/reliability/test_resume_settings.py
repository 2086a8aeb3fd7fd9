"""Item 1: a resume runs the settings its records name. A changed setting is refused, naming it,
unless it is one a resume may change (more steps, threads, logging and checkpoint intervals),
which is then recorded as what ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlm import cli
from flatlm.lm.checkpoint import CheckpointError, load_checkpoint
from flatlm.lm.train import train

BASE = {"optim__method": "sam", "train__steps": 4, "train__checkpoint_every": 2}


@pytest.fixture
def run(tiny_cfg, tmp_path) -> Path:
    """A finished 4-step SAM run to resume."""
    train(tiny_cfg(**BASE), tmp_path / "run", quiet=True)
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optim.lr", 0.01),
        ("optim.rho", 0.2),
        ("train.seed", 1),
        ("train.batch_size", 3),
        ("model.dropout", 0.1),
        ("data.train_tokens", 5000),
        ("train.warmup_steps", 1),
        ("optim.method_kwargs", {"sam": {"adaptive": True}}),
    ],
)
def test_a_changed_setting_is_refused_naming_it(tiny_cfg, run, key, value):
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError, match=rf"{key} is .* in the checkpoint but .* now"):
        train(tiny_cfg(**BASE, **{key.replace(".", "__"): value}), run, quiet=True, resume=True)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # config.json, result.json and the checkpoints untouched


def test_more_steps_are_allowed_and_recorded(tiny_cfg, run, capsys):
    result = train(tiny_cfg(**{**BASE, "train__steps": 6}), run, quiet=True, resume=True)
    change = {"step": 4, "key": "train.steps", "was": 4, "now": 6}
    assert result["status"] == "completed" and result["step"] == 6
    assert result["setting_changes"] == [change]
    assert json.loads((run / "result.json").read_text())["setting_changes"] == [change]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    assert load_checkpoint(run / "checkpoint.pt")["setting_changes"] == [change]
    assert "resuming at step 4 with changed settings: train.steps 4 -> 6" in capsys.readouterr().err


def test_fewer_steps_than_the_checkpoint_are_refused(tiny_cfg, run):
    with pytest.raises(CheckpointError, match=r"train\.steps is 3 but the checkpoint is at step 4"):
        train(tiny_cfg(**{**BASE, "train__steps": 3}), run, quiet=True, resume=True)


def test_the_cli_refuses_a_changed_setting_in_one_line(corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus_file), "--set", "model.size=micro",
            "--set", "model.block_size=16", "--set", "data.tokenizer=char", "--set",
            "train.batch_size=4", "--set", "train.threads=1", "--steps", "2", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--seed", "5", "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.seed is 0 in the checkpoint but 5 now" in err
    assert "optim.lr is 0.001 in the checkpoint but 0.5 now" in err
