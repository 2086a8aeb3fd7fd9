"""A finished run is never overwritten: ``flatlm train --out DIR`` without ``--resume`` on a
folder holding a run (its result.json or a checkpoint) is refused in one line naming
``--resume`` and another ``--out``, and the run's files stay as they were. Its W&B history
survives a kill -9."""

from __future__ import annotations

import os

import pytest

from flatlm import cli
from flatlm.lm.train import train
from lm.test_trackers import offline_wandb

__all__ = ["offline_wandb"]  # the fixture


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("how", ["completed", "stopped"])
def test_a_run_in_the_folder_is_not_replaced_without_resume(
    how, tiny_cfg, tiny_argv, tmp_path, capsys
):
    out = tmp_path / "run"
    if how == "stopped":  # a checkpoint and no result.json: what kill -9 leaves
        train(tiny_cfg(), out, quiet=True, stop_after=2)
        (out / "result.json").unlink()
    else:
        assert cli.main(tiny_argv(out)) == 0
    capsys.readouterr()
    before = _files(out)
    assert cli.main(tiny_argv(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} holds a" in err
    assert "pass --resume to continue" in err and "use another --out" in err
    assert _files(out) == before
    assert cli.main(tiny_argv(out, "--resume")) == 0  # the fix it names works


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads child pids from /proc")
def test_wandb_offline_history_survives_a_kill_9(tiny_cfg, tmp_path, offline_wandb):
    """kill -9 leaves the killed process's offline W&B file at its 7-byte header (measured):
    the resumed process's file alone holds the whole history, as metrics.jsonl does."""
    from lm.test_trackers import _expected_scalars, _records, _wandb_run

    cfg = tiny_cfg(train__log=["jsonl", "wandb"], train__wandb_project="flatlm-test")
    out = tmp_path / "run"
    train(cfg, out, quiet=True, stop_after=3)
    (first,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    first.write_bytes(first.read_bytes()[:7])  # what kill -9 left
    train(cfg, out, quiet=True, resume=True)
    (resumed,) = set((out / "wandb").glob("offline-run-*/run-*.wandb")) - {first}
    _, _, history = _wandb_run(resumed)
    expected = _expected_scalars(_records(out))
    assert {k for k in expected if k[1] <= 3} and history.keys() == expected.keys()
    for key, value in expected.items():
        assert history[key] == pytest.approx(value, rel=1e-12), key
