"""Item 7: temp files of killed writes do not stay behind, and run files get the permissions the
umask gives any new file (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from flatlm.lm.train import train


def test_temp_files_of_killed_writes_are_removed_when_the_folder_is_next_owned(tiny_cfg, tmp_path):
    train(tiny_cfg(train__steps=2), tmp_path, quiet=True)
    leftovers = [
        tmp_path / ".checkpoint.pt.12345-0a1b2c3d.tmp",  # a kill during a checkpoint write
        tmp_path / ".metrics.jsonl.k2j3h4g5",  # named as flatlm's writes were before
        tmp_path / ".result.json.999-ffffffff.tmp",
    ]
    keep = [tmp_path / ".notes", tmp_path / "notes.txt", tmp_path / ".checkpoint.ptx.tmp"]
    for path in leftovers + keep:
        path.write_bytes(b"half a file")
    train(tiny_cfg(train__steps=4), tmp_path, quiet=True, resume=True)
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in keep)  # only the workbench's own temp files go


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_run_files_honour_the_umask(tiny_cfg, tmp_path, umask):
    old = os.umask(umask)
    try:
        train(tiny_cfg(train__steps=2, train__checkpoint_every=1), tmp_path, quiet=True)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {"checkpoint.pt", "checkpoint.prev.pt", "result.json"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_a_write_into_a_missing_folder_names_the_file(tmp_path):
    from flatlm.lm._io import atomic_write_text

    target = tmp_path / "missing" / "x.json"
    with pytest.raises(FileNotFoundError) as e:
        atomic_write_text(target, "{}")
    assert e.value.filename == str(target)  # not the temp file beside it
