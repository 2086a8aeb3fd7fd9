"""Long runs: a killed run resumes with nothing lost; an unreadable checkpoint falls back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from flatlm.lm.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_latest_checkpoint,
    previous_checkpoint,
)
from flatlm.lm.train import train
from helpers.scripts import tiny_cli


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["adamw", "fsam"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(train__steps=6, train__checkpoint_every=2, optim__method=method)
    train(cfg, tmp_path / "straight", quiet=True)
    train(cfg, tmp_path / "cut", quiet=True, stop_after=4)  # checkpoints at steps 2 and 4
    latest = tmp_path / "cut" / "checkpoint.pt"
    assert load_checkpoint(previous_checkpoint(latest))["step"] == 2
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        result = train(cfg, tmp_path / "cut", quiet=True, resume=True)
    assert result["status"] == "completed"
    _assert_same(_params(tmp_path / "cut"), _params(tmp_path / "straight"))


def test_no_readable_checkpoint_at_all_is_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=4, train__checkpoint_every=2)
    train(cfg, tmp_path, quiet=True)
    for path in (tmp_path / "checkpoint.pt", previous_checkpoint(tmp_path / "checkpoint.pt")):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, tmp_path, quiet=True, resume=True)


STEPS = 200


def _cli(out: Path, corpus: Path, *extra: str) -> list[str]:
    argv = tiny_cli("train", corpus, "--quiet", "--steps", str(STEPS), optim__method="sam")
    return [*argv, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def straight_run(corpus_file, tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    out = tmp_path_factory.mktemp("straight")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(out, corpus_file), check=True, env=env, timeout=300)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_run_killed_in_a_subprocess_resumes_to_the_same_parameters(
    corpus_file, straight_run, tmp_path, sig
):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, corpus_file), env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it has written a checkpoint past step 5
        ckpt = killed / "checkpoint.pt"
        if previous_checkpoint(ckpt).is_file():
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert code != 0  # it did not finish
    # What --resume reads: a kill between the save's two renames leaves only the previous one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no checkpoint to resume from", UserWarning)
        step = load_latest_checkpoint(killed / "checkpoint.pt")["step"]
    assert 0 < step < STEPS

    subprocess.run([*_cli(killed, corpus_file), "--resume"], check=True, env=env, timeout=300)
    result = json.loads((killed / "result.json").read_text())
    assert result["status"] == "completed" and result["step"] == STEPS
    _assert_same(_params(killed), _params(straight_run))
