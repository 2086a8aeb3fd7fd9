"""A finished run is never overwritten: ``flatlm train --out DIR`` without ``--resume`` on a
folder holding a run (its result.json or a checkpoint) is refused in one line naming
``--resume`` and another ``--out``, and the run's files stay as they were."""

from __future__ import annotations

import pytest

from flatlm import cli
from flatlm.lm.train import train


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
