"""Several processes: ``flatlm launch --nproc-per-node N train|compare ...`` runs torchrun
(``--standalone``) in-process and keeps flatlm's exit codes and one-line errors (torchrun alone
ends every failure in its ``ChildFailedError`` traceback and exit code 1); a rank killed by a
signal is 128 + its number, named in one line, and the other rank says in one line why it
stopped (not a raw gloo traceback); the printed resume hints are commands that work."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from flatlm import cli

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_the_torchrun_resume_hint_is_a_command_that_works(monkeypatch):
    args = argparse.Namespace(argv=["train", "--preset", "quick"], out=None, resume=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(cli.LAUNCH_COMMAND_ENV, raising=False)
    assert cli._resume_command(args, "runs/x") == (
        "torchrun --standalone --nproc-per-node 2 -m flatlm.cli train --preset quick "
        "--out runs/x --resume"
    )  # without --standalone, torchrun waits for a rendezvous at localhost:29500
    monkeypatch.setenv(cli.LAUNCH_COMMAND_ENV, "flatlm launch --nproc-per-node 2")
    assert cli._resume_command(args, "runs/x").startswith("flatlm launch --nproc-per-node 2 ")


def _launch(tiny_argv, out: Path, *extra: str, **sets: object) -> list[str]:
    argv = tiny_argv(out, *extra, **sets)
    return [sys.executable, "-m", "flatlm.cli", "launch", "--nproc-per-node", "2", *argv]


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr
    return [x for x in stderr.splitlines() if x.startswith("flatlm ")]


@pytest.mark.slow
def test_a_bad_value_under_launch_is_exit_2_in_one_line(tiny_argv, tmp_path):
    done = subprocess.run(
        _launch(tiny_argv, tmp_path / "run", optim__lr="nan"),
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = _error_lines(done.stderr)
    assert lines == ["flatlm train: error: config key 'optim.lr' must be a finite number, got nan"]


def _rank_pid(parent: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the rank in /proc")
def test_kill_9_of_one_rank_is_named_and_the_run_resumes(tiny_argv, tmp_path):
    out = tmp_path / "run"
    argv = _launch(tiny_argv, out, train__steps=120, train__eval_every=0,
                   train__checkpoint_every=5, train__log_every=5)  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline, victim = time.time() + 240, None
    while victim is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        if (out / "checkpoint.pt").is_file():
            victim = _rank_pid(proc.pid, 1)
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    lines = _error_lines(stderr)
    assert (
        f"flatlm train: error: rank 1 (pid {victim}) was killed by SIGKILL; the last "
        "checkpoint is kept: run the same command with --resume" in lines
    )
    assert len(lines) <= 2  # and at most rank 0's own line, saying why it stopped
    assert all("another process of this run stopped" in x for x in lines if "rank 1" not in x)
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["step"] == 120
