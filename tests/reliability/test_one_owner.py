"""Item 2: a run folder is owned by one process at a time. A second one is refused, naming the
owner; the lock of a process that died (kill -9 included) is taken over with a warning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flatlm.lm.train as train_mod
from flatlm import cli
from flatlm.lm._io import LOCK_NAME, FolderError, StaleLockWarning
from flatlm.lm.train import train


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, "the first run ended before it took the folder"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_process_is_refused_and_a_killed_owners_lock_taken_over(
    tiny_cfg, tiny_argv, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = tiny_argv(out, train__steps=100_000, train__eval_every=0)
    first = subprocess.Popen([sys.executable, "-m", "flatlm.cli", *argv])
    try:
        _wait_for(out / "config.json", first)  # written under the lock
        config = (out / "config.json").read_bytes()
        with pytest.raises(FolderError, match=rf"in use by process {first.pid} on "):
            train(tiny_cfg(), out, quiet=True)
        assert cli.main(tiny_argv(out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by process {first.pid}" in err
        assert (out / "config.json").read_bytes() == config  # the owner's files untouched
        assert first.poll() is None  # and it runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    with pytest.warns(StaleLockWarning, match=rf"lock of process {first.pid} .* no longer running"):
        result = train(tiny_cfg(), out, quiet=True)
    assert result["status"] == "completed"
    assert not (out / LOCK_NAME).exists()  # released at the end


def _write_lock(out: Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host}))


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tiny_cfg, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid, socket.gethostname())
    with pytest.warns(StaleLockWarning, match=rf"process {dead.pid} on .* no longer running"):
        assert train(tiny_cfg(), tmp_path, quiet=True)["status"] == "completed"
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("where", ["a live process here", "another host"])
def test_a_lock_that_may_still_be_held_is_refused(tiny_cfg, tmp_path, where):
    # A live pid without the flock (a reused pid, say) or another host's process: we cannot
    # know that it is gone, so refuse, and say how to clear the lock if it is.
    pid, host = (os.getppid(), socket.gethostname()) if "here" in where else (1, "elsewhere")
    _write_lock(tmp_path, pid, host)
    with pytest.raises(FolderError, match=rf"process {pid} on {host}.*delete .*{LOCK_NAME}"):
        train(tiny_cfg(), tmp_path, quiet=True)
    assert not (tmp_path / "config.json").exists()


def test_the_lock_is_released_when_a_run_fails(tiny_cfg, tmp_path, monkeypatch):
    def failing_step(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(train_mod, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_cfg(), tmp_path, quiet=True)
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.undo()
    assert train(tiny_cfg(), tmp_path, quiet=True)["status"] == "completed"  # and no warning
