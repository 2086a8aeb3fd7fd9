"""A comparison folder has one owner (``run.lock``, as a run folder), its runs are not replaced
without ``--resume``, a finished run is reused only once its checkpoint verifies, and a worker
killed by SIGKILL is reported as killed (exit 1, one line), not as an interrupt (130)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from flatlm import cli
from flatlm.lm._io import LOCK_NAME, own_folder
from helpers.scripts import tiny_cli


def _compare_argv(tiny_argv, out, *extra):
    return ["compare", *tiny_argv(out, train__steps=2)[1:], "--methods", "adamw", "sam",
            "--seeds", "0", *extra]  # fmt: skip


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("flatlm compare: error: ") and err.count("\n") == 1, err
    return err


def test_a_second_comparison_into_the_folder_is_refused(tiny_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    with own_folder(out):  # another comparison owns it (the same flock train's folders use)
        assert cli.main(_compare_argv(tiny_argv, out)) == 2
        assert f"{out} is in use by process {os.getpid()}" in _one_line_error(capsys)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing ran
    assert cli.main(_compare_argv(tiny_argv, out)) == 0
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_comparison_is_not_redone_without_resume(tiny_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(_compare_argv(tiny_argv, out)) == 0
    before = (out / "runs/sam-s0/result.json").read_bytes()
    capsys.readouterr()
    assert cli.main(_compare_argv(tiny_argv, out)) == 2
    err = _one_line_error(capsys)
    assert f"{out} holds runs of a comparison" in err and "pass --resume to reuse" in err
    assert (out / "runs/sam-s0/result.json").read_bytes() == before
    assert cli.main(_compare_argv(tiny_argv, out, "--resume")) == 0


def test_resume_verifies_a_finished_runs_checkpoint_before_reusing_it(tiny_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(_compare_argv(tiny_argv, out)) == 0
    ckpt = out / "runs/adamw-s0/checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 3] ^= 0x10
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(_compare_argv(tiny_argv, out, "--resume")) == 2
    err = _one_line_error(capsys)
    assert f"cannot reuse the finished run {out / 'runs/adamw-s0'}: checkpoint {ckpt}" in err
    assert "SHA-256 does not match" in err and f"delete {out / 'runs/adamw-s0'}" in err


@pytest.mark.slow
def test_a_worker_killed_by_sigkill_is_reported_as_killed(corpus_file, tmp_path):
    out = tmp_path / "cmp"
    args = ["--steps", "150", "--jobs", "2", "--methods", "adamw", "sam", "--seeds", "0"]
    argv = [*tiny_cli("compare", corpus_file, *args, "--out", str(out)), "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / "runs/adamw-s0" / LOCK_NAME
    deadline = time.time() + 240
    worker = None
    while worker is None:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        try:
            worker = json.loads(lock.read_text())["pid"]  # the worker running adamw owns it
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr
    line = [x for x in stderr.splitlines() if x.startswith("flatlm compare: error: ")]
    assert len(line) == 1 and "Traceback" not in stderr, stderr
    assert "1 run failed (adamw s0: its worker process was killed by SIGKILL" in line[0]
    assert "--resume" in line[0] and "interrupted" not in stdout + stderr
    sam = json.loads((out / "runs/sam-s0/result.json").read_text())
    assert sam["status"] == "completed"
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "runs/adamw-s0/result.json").read_text())["status"] == "completed"


def test_a_damaged_run_config_is_named_on_resume(tiny_argv, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(_compare_argv(tiny_argv, out)) == 0
    config = out / "runs/sam-s0/config.json"
    config.write_text(config.read_text()[:40])
    capsys.readouterr()
    assert cli.main(_compare_argv(tiny_argv, out, "--resume")) == 2
    assert f"{config} is damaged or cut short" in _one_line_error(capsys)
    config.write_text('{"train": {"stepz": 2}}')
    assert cli.main(_compare_argv(tiny_argv, out, "--resume")) == 2
    err = _one_line_error(capsys)
    assert f"{config} cannot be read as a run config: unknown config key 'train.stepz'" in err
