"""Comparison folder: per-run dirs, the table, JSON numbers and plots; report rebuilds them."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from flatlm.lm.compare import compare
from flatlm.lm.report import write_report
from helpers.scripts import tiny_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_table_json_plots_and_report_rebuilds(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=3)
    out = tmp_path / "cmp"
    report = compare(cfg, out, ["adamw", "sam"], [0, 1], quiet=True)
    runs = {}
    for method in ("adamw", "sam"):
        for seed in (0, 1):
            runs[method, seed] = json.loads(
                (out / f"runs/{method}-s{seed}/result.json").read_text()
            )
    results = json.loads((out / "results.json").read_text())
    for method in ("adamw", "sam"):
        val = [runs[method, s]["val_loss"] for s in (0, 1)]
        row = results["summary"][method]
        assert row["val_loss"] == pytest.approx(statistics.fmean(val))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(val))
        assert row["seeds"] == [0, 1]
        tps = [runs[method, s]["time_per_step_s"] for s in (0, 1)]
        assert row["time_per_step_s"] == pytest.approx(statistics.fmean(tps))
    assert results["summary"]["adamw"]["time_vs_adamw"] == pytest.approx(1.0)
    assert len(results["runs"]) == 4 and all(len(r["val_curve"]) == 3 for r in results["runs"])
    table = (out / "results.md").read_text()
    adamw_row = next(line for line in table.splitlines() if line.startswith("| adamw |"))
    assert f"{results['summary']['adamw']['val_loss']:.4f} ± " in adamw_row
    assert report["table"] in table
    for name in ("val_loss.png", "val_loss_by_seed.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert (out / name).stat().st_size > 5000

    for name in ("results.md", "results.json", "val_loss.png"):
        (out / name).unlink()
    rebuilt = write_report(out)
    assert rebuilt["table"] == report["table"]
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert (out / "val_loss.png").is_file()


def test_compare_resume_skips_finished_runs(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=2)
    compare(cfg, tmp_path, ["adamw"], [0], quiet=True)
    result = tmp_path / "runs/adamw-s0/result.json"
    before = result.stat().st_mtime_ns
    compare(cfg, tmp_path, ["adamw"], [0], quiet=True, resume=True)
    assert result.stat().st_mtime_ns == before
    # a changed setting must not silently reuse the old run
    with pytest.raises(ValueError, match=r"train\.batch_size = 4 there, 8 now"):
        compare(
            tiny_cfg(train__steps=2, train__batch_size=8), tmp_path, ["adamw"], [0], resume=True
        )
    assert result.stat().st_mtime_ns == before


def test_a_comparison_takes_its_runs_from_the_study_queue(tiny_cfg, tmp_path, monkeypatch):
    """One queue for every sweep: a plain compare pops its runs from a study (flatlm.lm.study,
    as tune does), longest first, each once, and leaves no queue behind."""
    from flatlm.lm import study as st

    popped = []
    pop = st.pop_trial

    def spy(study, *args, **kwargs):
        trial = pop(study, *args, **kwargs)
        popped.append(None if trial is None else trial.user_attrs["slot"])
        return trial

    monkeypatch.setattr(st, "pop_trial", spy)
    out = tmp_path / "cmp"
    compare(tiny_cfg(train__steps=2), out, ["adamw", "sam"], [0, 1], quiet=True)
    assert popped == ["sam s0", "sam s1", "adamw s0", "adamw s1", None]
    assert not list(out.glob("queue.journal*"))
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "adamw-s0",
        "adamw-s1",
        "sam-s0",
        "sam-s1",
    ]


def test_report_on_a_non_comparison_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a comparison folder"):
        write_report(tmp_path)


def test_a_diverged_run_is_an_outcome_the_sweep_goes_on_and_resume_keeps_it(
    tiny_cfg, tmp_path, monkeypatch
):
    import flatlm.lm.compare as compare_mod

    real_train = compare_mod.train

    def train(cfg, out, **kwargs):  # sam "diverges" (the status flatlm train writes then)
        result = real_train(cfg, out, **kwargs)
        if cfg.optim.method == "sam":
            result |= {"status": "diverged", "reason": "non-finite validation loss"}
            (Path(out) / "result.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(compare_mod, "train", train)
    cfg = tiny_cfg(train__steps=2)
    report = compare(cfg, tmp_path, ["adamw", "sam"], [0], quiet=True)
    assert (tmp_path / "runs/adamw-s0/result.json").is_file()  # sam ran first; the sweep went on
    assert report["missing"] == []  # nothing for --resume to continue
    assert "| runs/sam-s0 | diverged | 2/2 | non-finite validation loss |" in report["table"]
    monkeypatch.setattr(compare_mod, "train", real_train)
    sam = tmp_path / "runs/sam-s0/result.json"
    before = sam.stat().st_mtime_ns
    report = compare(cfg, tmp_path, ["adamw", "sam"], [0], quiet=True, resume=True)
    assert sam.stat().st_mtime_ns == before and report["missing"] == []


STEPS = 100  # sam, the slower, is signalled at its first checkpoint (step 5)


def _compare_cli(out: Path, corpus: Path, *extra: str) -> list[str]:
    args = ["--steps", str(STEPS), "--jobs", "2", "--methods", "adamw", "sam", "--seeds", "0"]
    return [*tiny_cli("compare", corpus, *args, "--out", str(out)), *extra]


@pytest.mark.slow
def test_sigint_to_the_whole_process_group_is_one_clean_interrupt(corpus_file, tmp_path):
    """`timeout -s INT` and schedulers signal the parent and every worker at once (the parent
    even twice): one clean stop, checkpoints written, exit code 130, and --resume finishes."""
    out = tmp_path / "cmp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _compare_cli(out, corpus_file),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under `timeout`
    )
    runs = [out / "runs/adamw-s0", out / "runs/sam-s0"]
    deadline = time.time() + 240
    while time.time() < deadline and not all((r / "checkpoint.pt").is_file() for r in runs):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)  # timeout: first to its child,
    os.killpg(proc.pid, signal.SIGINT)  # then to the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "continue with" in stdout + stderr
    statuses = []
    for run in runs:
        assert (run / "checkpoint.pt").is_file()
        result = json.loads((run / "result.json").read_text())
        statuses.append(result["status"])
        assert result["status"] in ("interrupted", "completed")
        assert result["status"] == "completed" or 0 < result["step"] < STEPS
    assert "interrupted" in statuses

    resume = _compare_cli(out, corpus_file, "--resume", "--set", "train.checkpoint_every=0")
    done = subprocess.run(resume, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert result["status"] == "completed" and result["step"] == STEPS
    assert "[1/2] " in done.stderr and "[2/2] " in done.stderr  # one line per finished run
    assert "ms/step alone" in (out / "results.md").read_text()  # the probe's column
    probe = json.loads((out / "step_time_probe.json").read_text())
    assert set(probe["ms_per_step"]) == {"adamw", "sam"}
