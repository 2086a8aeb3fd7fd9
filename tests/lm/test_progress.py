"""What `flatlm compare` says while it runs, the thread policy, and one stop per interrupt."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import pytest

from flatlm.lm import _process
from flatlm.lm._process import default_threads, stop_on_signals
from flatlm.lm.compare import SweepProgress, Task, compare


@pytest.mark.parametrize(
    ("jobs", "cpus", "load", "torch_default", "expected"),
    [
        (2, 2, 0.0, 2, 1),  # the main job: two processes on two cores
        (1, 2, 0.4, 2, 2),  # an idle 2-core machine: torch's default
        (1, 2, 1.9, 2, 1),  # a busy one: the idle core only (the 1,664 vs ~600 ms/step case)
        (1, 2, 7.5, 2, 1),  # overloaded: still one
        (3, 2, 0.0, 2, 1),  # more jobs than cores: one each
        (1, 16, 0.3, 8, 8),  # never above torch's default (physical cores)
        (2, 16, 6.0, 8, 5),  # the idle cores' share
    ],
)
def test_default_threads_fits_the_machine_the_load_and_the_jobs(
    jobs, cpus, load, torch_default, expected
):
    choice = default_threads(jobs, cpus=cpus, load=load, torch_default=torch_default)
    assert choice.threads == expected
    assert f"{cpus} usable cores, load {load:.1f}, {jobs} job" in choice.reason
    assert choice.reason.startswith(f"{expected} torch thread")


def test_default_threads_reads_the_machine():
    choice = default_threads(1)
    assert 1 <= choice.threads <= max(1, os.cpu_count() or 1)


def test_one_interrupt_delivered_twice_is_one_stop_and_a_later_one_aborts(monkeypatch):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where started in the background (nohup &)
    with stop_on_signals() as flag:
        # what `timeout -s INT` does: the signal to its child, then to the whole group
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert flag.is_set()
        with stop_on_signals() as inner:  # the training loop inside compare shares the flag
            assert inner is flag
        monkeypatch.setattr(_process, "SAME_INTERRUPT_S", 0.0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before


def _task(tmp_path, method, seed, steps=200, prior=0):
    return Task({}, str(tmp_path / f"{method}-s{seed}"), True, False, method, seed, steps, prior)


@pytest.mark.slow
def test_not_on_a_terminal_one_line_per_finished_run_and_nothing_per_step(tiny_cfg, tmp_path):
    buf = io.StringIO()
    cfg = tiny_cfg(train__steps=4, train__threads=0)
    compare(cfg, tmp_path / "a", ["adamw", "sam"], [0], stream=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("flatlm compare: 2 runs (2 methods x 1 seeds) into ")
    assert "torch thread" in lines[0] and "train.threads=0" in lines[0]  # what was chosen
    runs = [x for x in lines if x.startswith("[")]
    assert [x.split(":")[0] for x in runs] == ["[1/2] sam s0", "[2/2] adamw s0"]
    result = json.loads((tmp_path / "a/runs/adamw-s0/result.json").read_text())
    assert f"val loss {result['val_loss']:.4f}, test loss {result['test_loss']:.4f}" in runs[1]
    assert "ETA" in runs[0] and "ETA" not in runs[1]
    assert len(lines) <= 3 + 1  # header, the two runs, at most the tokenising note

    quiet = io.StringIO()
    compare(cfg, tmp_path / "b", ["adamw"], [0], quiet=True, stream=quiet)
    assert quiet.getvalue() == ""


def test_on_a_terminal_a_live_bar_with_runs_steps_and_eta(tmp_path):
    tasks = [_task(tmp_path, "sam", 0), _task(tmp_path, "fsam", 0), _task(tmp_path, "adamw", 0)]
    buf = io.StringIO()
    progress = SweepProgress(tasks, 2, stream=buf, live=True)
    progress.begin()
    for t in tasks[:2]:
        progress.running(t)
    (tmp_path / "sam-s0").mkdir()
    records = [{"step": 0, "split": "val", "loss": 7.0}, {"step": 40, "split": "val", "loss": 6.0}]
    (tmp_path / "sam-s0/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flag = _process.threading.Event()
    progress.poll(flag)
    screen = buf.getvalue()
    assert "0/3 runs" in screen and "sam s0 40/200" in screen and "fsam s0 0/200" in screen
    assert "ETA" in screen
    result = {"status": "completed", "step": 200, "val_loss": 5.0, "test_loss": 5.1}
    progress.finished(tasks[0], result | {"wall_time_s": 61.0})
    progress.finished(tasks[1], {"status": "diverged", "step": 200, "reason": "nan"})
    progress.close()
    screen = buf.getvalue()
    assert "[1/3] sam s0: val loss 5.0000, test loss 5.1000, 1 min 01 s; ETA" in screen
    assert "[2/3] fsam s0: diverged at step 200/200 (nan); not counted as a completed run" in screen
    assert "2/3 runs" in screen


def test_eta_weighs_sharpness_aware_steps_double_and_skips_reused_runs(tmp_path):
    tasks = [_task(tmp_path, "sam", 0, 100), _task(tmp_path, "adamw", 0, 100)]
    progress = SweepProgress(tasks, 2, enabled=False)
    assert progress.total_units() == 300
    progress.finished(tasks[1], {"status": "completed", "reused": True, "step": 100})
    assert progress.total_units() == 200 and progress.done_units() == 0
    assert progress.eta() is None
