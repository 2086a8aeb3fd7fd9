"""Limits of the machine and of the values: a seed torch cannot take, more threads than CPUs,
a context longer than the data, memory or disk running out. Each is one line naming the key or
the resource and the fix (exit code 2), and leaves no half-made run folder: none at all when
refused before the run, the previous checkpoint intact when a write fails."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

import flatlm.lm.train as train_mod
from flatlm import cli
from flatlm.lm.train import train


def _one_line_error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("tokenising ")]
    assert len(lines) == 1 and lines[0].startswith("flatlm train: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"train__seed": 99999999999999999999}, "'train.seed' must be in [0, 9223372036854775807]"),
        ({"train__seed": -1}, "'train.seed' must be in [0, "),
        ({"train__threads": 100_000}, "'train.threads' is 100000 but this machine has"),
        ({"model__block_size": 100_000_000}, "fewer than block_size+1 = 100000001"),
    ],
    ids=["huge seed", "negative seed", "threads", "block_size"],
)
def test_an_impossible_value_leaves_no_run_folder(sets, message, tiny_argv, tmp_path, capsys):
    out = tmp_path / "runs" / "run"
    assert cli.main(tiny_argv(out, **sets)) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()  # not even the parent it would have made


def test_the_default_folder_is_not_left_empty(tiny_argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(tiny_argv(None, "--seed", "99999999999999999999")) == 2
    assert "'train.seed'" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_is_a_one_line_error(tiny_argv, tmp_path, capsys, monkeypatch):
    real_build = train_mod.build_model

    def build_model(*args, **kwargs):  # a model far larger than memory: the real allocator error
        torch.empty(2**44, dtype=torch.float32)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_mod, "build_model", build_model)
    out = tmp_path / "run"
    assert cli.main(tiny_argv(out)) == 2
    err = _one_line_error(capsys)
    assert "out of memory: " in err and "can't allocate memory" in err
    assert "use a smaller model (model.size, n_layer, n_embd), model.block_size, " in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"train__batch_size": 10**11}, "Unable to allocate"),  # numpy's MemoryError
        ({"train__eval_batches": 10**11}, "Unable to allocate"),
    ],
)
def test_batches_larger_than_memory_are_a_one_line_error(
    sets, message, tiny_argv, tmp_path, capsys
):
    out = tmp_path / "run"
    assert cli.main(tiny_argv(out, **sets)) == 2
    err = _one_line_error(capsys)
    assert err.startswith("flatlm train: error: out of memory: ") and message in err
    assert not out.exists()


def test_a_full_disk_is_a_one_line_error_and_the_checkpoint_survives(tiny_cfg, tiny_argv, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(), out, quiet=True, stop_after=3)
    ckpt = (out / "checkpoint.pt").read_bytes()
    limit = len(ckpt) // 2  # every new checkpoint is cut short (ulimit -f)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [sys.executable, "-m", "flatlm.cli", *tiny_argv(out, "--resume")]
    done = subprocess.run(argv, preexec_fn=small_files, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.startswith("flatlm train: error: cannot write ")
        and done.stderr.count("\n") == 1
    ), done.stderr
    assert (
        "File too large (a full disk or a file size limit); free space, then resume with "
        "--resume (the last checkpoint" in done.stderr
    )
    assert (out / "checkpoint.pt").read_bytes() == ckpt  # the previous checkpoint, intact
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    assert not (out / "run.lock").exists()
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
