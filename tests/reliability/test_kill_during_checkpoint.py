"""kill -9 in the middle of a checkpoint write (while the file is written, and between the two
renames that put it in place) loses nothing: the resumed run ends with the same parameters as
one that was never killed, and no temp file stays behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlm import cli
from flatlm.lm._io import StaleLockWarning
from flatlm.lm.checkpoint import load_checkpoint, previous_checkpoint

# `flatlm train` that SIGKILLs itself during its Nth checkpoint write, at POINT: "writing" (the
# temp file holds all but the digest) or "renaming" (the old checkpoint has just been moved to
# checkpoint.prev.pt, the new one is not yet in place).
KILLER = """
import os, signal, sys
from flatlm.lm import checkpoint
point, nth, writes = sys.argv[1], int(sys.argv[2]), 0
real_seal, real_replace = checkpoint._Sealed.seal, os.replace

def seal(self):
    global writes
    writes += 1
    if point == "writing" and writes == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    real_seal(self)

def replace(src, dst):
    real_replace(src, dst)
    if point == "renaming" and writes == nth and str(dst).endswith("checkpoint.prev.pt"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint._Sealed.seal, os.replace = seal, replace
from flatlm.cli import main
sys.exit(main(sys.argv[3:]))
"""
SETTINGS = {"train__steps": 20, "train__checkpoint_every": 5, "optim__method": "sam"}


def _temp_files(run: Path) -> list[Path]:
    return sorted(run.glob(".checkpoint.pt.*"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["writing", "renaming"])
def test_a_kill_during_a_checkpoint_write_resumes_to_the_same_parameters(
    tiny_argv, tmp_path, point
):
    killed = tmp_path / "killed"
    argv = tiny_argv(killed, **SETTINGS, model__dropout=0.1)  # dropout: the RNG state matters
    done = subprocess.run([sys.executable, "-c", KILLER, point, "3", *argv], timeout=300)
    assert done.returncode == -9
    latest = killed / "checkpoint.pt"
    assert len(_temp_files(killed)) == 1  # the write it was killed in
    if point == "writing":
        assert load_checkpoint(latest)["step"] == 10  # the last complete one
    else:
        assert not latest.exists() and load_checkpoint(previous_checkpoint(latest))["step"] == 10

    with pytest.warns(UserWarning) as warned:
        assert cli.main([*argv, "--resume"]) == 0
    assert any(w.category is StaleLockWarning for w in warned)  # the killed run's lock
    fell_back = any("resuming from the previous checkpoint" in str(w.message) for w in warned)
    assert fell_back == (point == "renaming")
    straight = tmp_path / "straight"
    assert cli.main(tiny_argv(straight, **SETTINGS, model__dropout=0.1)) == 0
    a, b = load_checkpoint(latest), load_checkpoint(straight / "checkpoint.pt")
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert _temp_files(killed) == []
