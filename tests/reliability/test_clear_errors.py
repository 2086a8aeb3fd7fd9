"""Item 6 and the raw tracebacks: out-of-range values, loose method options, impossible devices
and unusable folders are one-line errors naming the cause (exit code 2), before anything runs;
the resume hint after an interrupt is the full command."""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch

import flatlm.lm.train as train_mod
from flatlm import cli

BAD_VALUES = [
    (["--set", "train.min_lr_ratio=-0.5"], "'train.min_lr_ratio' must be in [0, 1]"),
    (["--set", "train.warmup_steps=-1"], "'train.warmup_steps' must be >= 0"),
    (["--set", "train.checkpoint_every=-1"], "'train.checkpoint_every' must be >= 0"),
    (["--set", "train.grad_clip=-1"], "'train.grad_clip' must be >= 0"),
    (["--set", "train.threads=-1"], "'train.threads' must be >= 0"),
    (["--set", "train.log_every=0"], "'train.log_every' must be > 0"),
    (["--steps", "0"], "'train.steps' must be > 0"),
    (["--set", "optim.lr=nan"], "'optim.lr' must be a finite number"),
    (["--method", "gasam:normalize=no"], "'normalize' in 'gasam:normalize=no' must be true or"),
    (["--method", "gasam:ascent_steps=true"], "'ascent_steps' in 'gasam:ascent_steps=true' must"),
    (["--method", "gasam:alpah=1"], "gasam has no option 'alpah' in 'gasam:alpah=1': did you"),
    (["--method", "sam:rho=-1"], "'optim.method' ('sam:rho=-1'): rho must be a finite number"),
    (["--method", "sam:lr=0.1"], "option 'lr' is set by optim.lr in the workbench"),
    (["--set", "optim.method_kwargs={gasam={alpah=1}}"], "'optim.method_kwargs.gasam': gasam"),
    (["--device", "tpu"], "'train.device' must be 'cpu' or 'cuda[:N]', got 'tpu'"),
]


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str = "train") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"flatlm {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_a_one_line_error_naming_it(tmp_path, capsys, args, message):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False); use --device cpu" in _one_line_error(capsys)


def test_compare_refuses_bad_settings_before_any_run(tiny_argv, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[optim.method_kwargs.gasam]\nalpah = 1.0\n")
    compare = ["compare", *tiny_argv(tmp_path / "cmp")[1:], "--config", str(config)]
    assert cli.main([*compare, "--methods", "adamw", "gasam", "--seeds", "0"]) == 2
    assert "'optim.method_kwargs.gasam': gasam has no option 'alpah'" in _one_line_error(
        capsys, "compare"
    )
    assert not (tmp_path / "cmp").exists()  # not even the AdamW runs
    config.unlink()
    assert cli.main([*compare[:-2], "--jobs", "0"]) == 2
    assert "'compare.jobs' must be > 0" in _one_line_error(capsys, "compare")


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_out_folder_is_a_one_line_error(
    tiny_argv, tmp_path, capsys, monkeypatch, where
):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = {"a file": blocker, "under a file": blocker / "run", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # as root, chmod would not stop us: fail mkdir as a read-only fs
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == out:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    assert cli.main(tiny_argv(out)) == 2
    assert f"cannot write in {out}: " in _one_line_error(capsys)


def test_an_unusable_cache_is_a_one_line_error(tiny_argv, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FLATLM_CACHE", str(blocker))
    assert cli.main(tiny_argv(tmp_path / "run")) == 2
    err = _one_line_error(capsys)
    assert f"cannot write the token cache in {blocker}" in err and "FLATLM_CACHE" in err


def test_the_resume_hint_is_the_full_command(tiny_argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --out: the default folder under runs/
    real_step, calls = train_mod.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    assert cli.main(tiny_argv(None, "--method", "sam", "--seed", "3")) == 130
    hint = capsys.readouterr().out.splitlines()[-1].strip()
    assert hint.startswith("flatlm train ") and "--resume" in hint
    # the default folder: named after the corpus and a hash of the settings (issue 30)
    out = re.search(r"--out (runs/default-speeches-[0-9a-f]{6}/sam-s3) ", hint)
    assert "--set model.size=micro" in hint and out is not None
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert cli.main(shlex.split(hint)[1:]) == 0  # as printed
    assert '"status": "completed"' in (tmp_path / out[1] / "result.json").read_text()


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes("[optim]\nmethod = 'sam' # r\u00e9glage\n".encode("latin-1"))
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert f"config file {config} is not UTF-8 text (byte offset 26); save it as UTF-8" in err
