"""A run checkpoints by default: ``train.checkpoint_minutes`` (default 5) writes one whenever
that much wall time has passed since the last, so kill -9 of a run started with the defaults
(``checkpoint_every = 0``) loses at most those minutes and ``--resume`` continues it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from flatlm.lm.config import RunConfig
from flatlm.lm.train import CheckpointClock


def test_the_default_is_a_checkpoint_every_five_minutes():
    tc = RunConfig().train
    assert tc.checkpoint_every == 0 and tc.checkpoint_minutes == 5.0
    clock = CheckpointClock(5.0)
    assert not clock.due()
    clock.last -= 299.0
    assert not clock.due()
    clock.last -= 2.0
    assert clock.due()
    clock.reset()
    assert not clock.due() and not CheckpointClock(0.0).due()


def test_kill_9_of_a_run_without_checkpoint_every_resumes(tiny_argv, tmp_path):
    out = tmp_path / "run"
    # checkpoint_every stays 0 (the default); only the clock, at 0.1 s instead of 5 min
    argv = [sys.executable, "-m", "flatlm.cli",
            *tiny_argv(out, train__steps=300, train__eval_every=0, train__log_every=10,
                       train__checkpoint_minutes=0.1 / 60)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").is_file():
        assert proc.poll() is None, f"ended before a timed checkpoint: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "result.json").exists()
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["step"] == 300
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(10, 301, 10))  # one history, no step twice
