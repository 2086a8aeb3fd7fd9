"""The workbench sharded with FSDP2 (``train.strategy = "fsdp"``): 2 gloo processes on CPU.

One sharded SAM run of 6 steps (dropout 0.1, a checkpoint every 2 steps, the sharpness figures
every 3) is the reference: it equals the 2-rank DDP run of the same config to float32 tolerance;
the same run stopped after step 3 and resumed on 2 ranks ends bit for bit where it does; resumed
on 1 rank (a mesh of one) its first step sees rank 0's windows of the reference and logs its loss;
a damaged shard is found before anything is loaded. Run as a script (under torchrun) this file
trains one run: ``OUT STOP_AFTER RESUME KEY=VALUE...``, so a test can stop a run after a step.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
STEPS, STOP = 6, 3

# The reference run: a micro GPT on the test corpus, 2 windows per rank and step, every step
# logged, a checkpoint at steps 2 and 4 (and at the end, or at a stop).
SETTINGS: dict[str, Any] = {
    "model.size": "micro",
    "model.block_size": 16,
    "model.dropout": 0.1,
    "data.tokenizer": "char",
    "optim.method": "sam",
    "train.strategy": "fsdp",
    "train.steps": STEPS,
    "train.batch_size": 2,
    "train.warmup_steps": 2,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.test_batches": 1,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.sharpness_every": 3,
    "train.sharpness_iters": 2,
    "train.threads": 1,
}


def _settings(corpus: Path, **extra: Any) -> dict[str, Any]:
    return (
        SETTINGS
        | {"data.corpus": str(corpus)}
        | {k.replace("__", "."): v for k, v in extra.items()}
    )


def _launch(
    tmp: pytest.TempPathFactory,
    out: Path,
    corpus: Path,
    ranks: int,
    stop_after: int = 0,
    resume: bool = False,
    **extra: Any,
) -> None:
    """This file as a script under torchrun: one run into ``out``."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "FLATLM_CACHE": str(tmp.getbasetemp() / "flatlm-cache"),  # conftest's private cache
    }
    sets = [
        f"{k}={json.dumps(v) if isinstance(v, str) else v}"
        for k, v in _settings(corpus, **extra).items()
    ]
    argv = [*TORCHRUN, str(ranks), __file__, str(out), str(stop_after), str(int(resume)), *sets]
    subprocess.run(argv, check=True, env=env, timeout=300)


def _params(run: Path) -> dict[str, torch.Tensor]:
    from flatlm.lm.checkpoint import load_checkpoint, load_trained

    if (run / "checkpoint.pt").is_file():
        return load_checkpoint(run / "checkpoint.pt")["model"]
    return load_trained(run)[0].state_dict()  # the shards of checkpoint.dcp put together


def _records(run: Path, split: str) -> dict[int, dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def _timeless(records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {step: {k: v for k, v in r.items() if k != "elapsed_s"} for step, r in records.items()}


def _result(run: Path) -> dict[str, Any]:
    return json.loads((run / "result.json").read_text())


@pytest.fixture(scope="module")
def reference(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _launch(tmp_path_factory, out, corpus_file, 2)
    return out


@pytest.fixture(scope="module")
def stopped(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference stopped after step 3: checkpoints at step 2 (previous) and 3 (latest)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    _launch(tmp_path_factory, out, corpus_file, 2, stop_after=STOP)
    return out


@pytest.fixture
def stopped_copy(stopped: Path, tmp_path: Path) -> Path:
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


def test_an_fsdp_run_writes_a_verified_sharded_checkpoint(reference):
    from flatlm.lm.checkpoint import MANIFEST_NAME, read_run_state, sharded_problems

    result = _result(reference)
    assert result["status"] == "completed" and result["step"] == STEPS
    assert json.loads((reference / "config.json").read_text())["train"]["strategy"] == "fsdp"
    ckpt = reference / "checkpoint.dcp"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", MANIFEST_NAME, "run_state.pt"]
    manifest = json.loads((ckpt / MANIFEST_NAME).read_text())
    assert manifest["world_size"] == 2 and set(manifest["files"]) == set(names) - {MANIFEST_NAME}
    assert sharded_problems(ckpt, (0, 1)) == []
    state = read_run_state(ckpt)
    assert state["step"] == STEPS and len(state["rng"]["ranks"]) == 2
    # The one it replaced is kept (at the last step the periodic and the final checkpoint meet).
    assert sharded_problems(reference / "checkpoint.prev.dcp", (0, 1)) == []
    assert not (reference / "checkpoint.pt").exists()
    assert not list(reference.glob(".checkpoint.dcp.tmp*"))
    # The sharpness figures ran (on a gathered copy) at steps 0, 3 and 6.
    sharpness = _records(reference, "sharpness")
    assert sorted(sharpness) == [0, 3, 6]
    assert all(math.isfinite(r["hessian.lambda_max"]) for r in sharpness.values())


def test_two_fsdp_ranks_equal_two_ddp_ranks(reference, corpus_file, tmp_path_factory):
    ddp = tmp_path_factory.mktemp("ddp") / "run"
    _launch(tmp_path_factory, ddp, corpus_file, 2, train__strategy="ddp")
    a, b = _params(ddp), _params(reference)
    assert a.keys() == b.keys()
    # Float32 sums in another order (reduce-scatter and sharded norms vs all-reduce): Adam's
    # steps are ~lr = 1e-3 per element, so 1e-5 is 1% of one step.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for split in ("train", "val", "sharpness"):
        want, got = _records(ddp, split), _records(reference, split)
        assert want.keys() == got.keys()
        for step in want:
            assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
    for step, r in _records(ddp, "sharpness").items():
        got = _records(reference, "sharpness")[step]["hessian.lambda_max"]
        assert got == pytest.approx(r["hessian.lambda_max"], rel=1e-3)


def test_stop_and_resume_on_two_ranks_is_bit_exact(
    reference, stopped_copy, corpus_file, tmp_path_factory
):
    assert _result(stopped_copy)["status"] == "stopped"
    _launch(tmp_path_factory, stopped_copy, corpus_file, 2, resume=True)
    result = _result(stopped_copy)
    assert result["status"] == "completed" and result["step"] == STEPS
    assert result["setting_changes"] == []
    a, b = _params(reference), _params(stopped_copy)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for split in ("train", "val", "sharpness"):  # the same numbers, apart from the times
        assert _timeless(_records(stopped_copy, split)) == _timeless(_records(reference, split))


def _train_one_rank(run: Path, corpus: Path, **extra: Any) -> dict[str, Any]:
    """Resume ``run`` in this process: FSDP2 on a mesh of one rank."""
    from flatlm.lm.config import load_config
    from flatlm.lm.train import train

    return train(load_config(overrides=_settings(corpus, **extra)), run, resume=True, quiet=True)


def _continues_on_one_rank(run: Path, reference: Path, corpus: Path, resumed_at: int) -> None:
    result = _train_one_rank(run, corpus)
    assert result["status"] == "completed" and result["step"] == STEPS
    assert {"step": resumed_at, "key": "world_size", "was": 2, "now": 1} in result[
        "setting_changes"
    ]
    assert not dist.is_initialized()  # the process group of one rank was the run's own
    train_loss, ref_loss = _records(run, "train"), _records(reference, "train")
    assert sorted(train_loss) == list(range(1, STEPS + 1))
    for step in range(1, resumed_at + 1):  # the history is the checkpoint's
        assert train_loss[step]["loss"] == ref_loss[step]["loss"]
    # The sampler draws the global batch, now 2 windows instead of 4: the first 2 of the 4 the
    # reference drew, i.e. rank 0's share, whose loss rank 0 logged. Later steps see other data.
    step = resumed_at + 1
    assert train_loss[step]["loss"] == pytest.approx(ref_loss[step]["loss"], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in train_loss.values())
    val = _records(run, "val")
    assert val[STEPS]["loss"] < val[0]["loss"]


def test_save_on_two_ranks_resume_on_one_continues(reference, stopped_copy, corpus_file):
    _continues_on_one_rank(stopped_copy, reference, corpus_file, resumed_at=STOP)


def test_a_damaged_shard_is_detected_and_the_previous_checkpoint_used(
    reference, stopped_copy, corpus_file
):
    from flatlm.lm.checkpoint import CheckpointError, load_latest_sharded, sharded_problems

    shard = stopped_copy / "checkpoint.dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of rank 1's shard
    shard.write_bytes(bytes(data))
    assert sharded_problems(shard.parent, (0, 1)) == [
        f"checkpoint {shard.parent} is corrupt or truncated: the SHA-256 of __1_0.distcp does "
        "not match the one in its manifest.json"
    ]
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        _continues_on_one_rank(stopped_copy, reference, corpus_file, resumed_at=2)

    # Both unusable (the latest incomplete: no manifest) is an error naming both.
    (stopped_copy / "checkpoint.dcp" / "manifest.json").unlink()
    prev = stopped_copy / "checkpoint.prev.dcp"
    (prev / "run_state.pt").write_bytes((prev / "run_state.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"no manifest\.json.*previous one.*run_state\.pt"):
        load_latest_sharded(stopped_copy / "checkpoint.dcp")


def test_a_damaged_previous_checkpoint_is_verified_before_it_is_used(stopped_copy):
    # The latest unusable (no manifest) and one bit of the previous one's shard flipped: its
    # run state still reads, so only verifying the previous folder's files can refuse it.
    from flatlm.lm.checkpoint import CheckpointError, load_latest_sharded

    (stopped_copy / "checkpoint.dcp" / "manifest.json").unlink()
    shard = stopped_copy / "checkpoint.prev.dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"no manifest\.json.*previous one.*SHA-256 of __0_0\.distcp"
    ):
        load_latest_sharded(stopped_copy / "checkpoint.dcp")


def test_a_ddp_folder_is_not_resumed_as_fsdp(stopped_copy, corpus_file):
    from flatlm.lm.checkpoint import CheckpointError

    for name in ("checkpoint.dcp", "checkpoint.prev.dcp"):
        shutil.rmtree(stopped_copy / name)
    (stopped_copy / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"train\.strategy = 'ddp'.*resume with train\.strategy=ddp"
    ):
        _train_one_rank(stopped_copy, corpus_file)


def test_the_strategy_is_checked_by_name():
    from flatlm.lm.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=re.escape("'train.strategy' must be one of 'ddp', 'fsdp', got 'zero'")
    ):
        load_config(overrides={"train.strategy": "zero"})
    with pytest.raises(
        ConfigError, match=re.escape("'train.compile' is true but train.strategy is 'fsdp'")
    ):
        load_config(overrides={"train.strategy": "fsdp", "train.compile": True})


def _main(argv: list[str]) -> None:
    """``OUT STOP_AFTER RESUME KEY=VALUE...``: one run (under torchrun, one rank of it)."""
    from flatlm.lm.config import load_config
    from flatlm.lm.train import train

    out, stop_after, resume, *sets = argv
    cfg = load_config(overrides=sets)
    train(cfg, out, resume=resume == "1", quiet=True, stop_after=int(stop_after) or None)


if __name__ == "__main__":
    _main(sys.argv[1:])
