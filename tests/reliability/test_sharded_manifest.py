"""A sharded checkpoint (``checkpoint.dcp/``, FSDP2) is loaded only if its manifest lists
every file in the folder and every rank's shard, each with its SHA-256: a shard whose entry is
missing is never loaded unverified, and a file the manifest does not list is refused."""

from __future__ import annotations

import json

import pytest

from flatlm.lm.checkpoint import MANIFEST_NAME, CheckpointError, sharded_problems
from flatlm.lm.train import train


@pytest.fixture
def sharded_run(tiny_cfg, tmp_path):
    """A single-process FSDP2 run stopped at step 2 (one sharded checkpoint)."""
    out = tmp_path / "run"
    train(tiny_cfg(train__strategy="fsdp"), out, quiet=True, stop_after=2)
    return out


def _edit_manifest(ckpt, edit):
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    edit(manifest)
    (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_shard_the_manifest_does_not_list_is_refused(sharded_run, tiny_cfg):
    ckpt = sharded_run / "checkpoint.dcp"
    assert sharded_problems(ckpt) == []
    _edit_manifest(ckpt, lambda m: m["files"].pop("__0_0.distcp"))
    shard = ckpt / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # and the shard damaged: it must not be loaded
    shard.write_bytes(bytes(data))
    message = f"checkpoint {ckpt} is not verifiable: its {MANIFEST_NAME} does not list __0_0"
    assert sharded_problems(ckpt) == [message + ".distcp"]
    with pytest.raises(CheckpointError, match=message):
        train(tiny_cfg(train__strategy="fsdp"), sharded_run, resume=True, quiet=True)


def test_a_missing_shard_without_an_entry_is_named(sharded_run):
    ckpt = sharded_run / "checkpoint.dcp"
    _edit_manifest(ckpt, lambda m: m["files"].pop("__0_0.distcp"))
    (ckpt / "__0_0.distcp").unlink()
    assert sharded_problems(ckpt) == [
        f"checkpoint {ckpt} is not verifiable: its {MANIFEST_NAME} does not list __0_0.distcp "
        "(of rank 0, also missing)"
    ]


def test_a_file_the_manifest_does_not_list_is_refused(sharded_run, tiny_cfg):
    ckpt = sharded_run / "checkpoint.dcp"
    (ckpt / "__1_0.distcp").write_bytes(b"a shard from somewhere else")
    with pytest.raises(CheckpointError, match=r"does not list __1_0\.distcp"):
        train(tiny_cfg(train__strategy="fsdp"), sharded_run, resume=True, quiet=True)
    (ckpt / "__1_0.distcp").unlink()
    result = train(tiny_cfg(train__strategy="fsdp"), sharded_run, resume=True, quiet=True)
    assert result["status"] == "completed"
