"""The workbench under torchrun: 2 gloo processes on CPU equal one process on the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flatlm.lm.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _train_args(corpus: Path, out: Path, batch_size: int, method: str) -> list[str]:
    sets = {
        "model.size": "micro",
        "model.block_size": "16",
        "data.tokenizer": "char",
        "data.corpus": str(corpus),
        "train.batch_size": str(batch_size),
        "train.eval_every": "2",
        "train.eval_batches": "1",
        "train.test_batches": "1",
        "train.threads": "1",
        "optim.method": method,
    }
    args = ["-m", "flatlm.cli", "train", "--quiet", "--steps", "4", "--out", str(out)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.mark.parametrize("method", ["fsam", "adamw"])
def test_torchrun_two_ranks_equal_one_process_on_the_global_batch(corpus_file, tmp_path, method):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(
        [sys.executable, *_train_args(corpus_file, single, 4, method)], check=True, env=env
    )
    launched = subprocess.run(
        [*TORCHRUN, *_train_args(corpus_file, multi, 2, method)],
        check=True,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert launched.stdout.count(" steps, val loss ") == 1  # rank 0 speaks for the run
    result = json.loads((multi / "result.json").read_text())
    assert result["status"] == "completed" and result["step"] == 4
    # batch_size is per rank: 2 ranks x 2 windows see the tokens one process sees with 4
    assert result["tokens_seen"] == json.loads((single / "result.json").read_text())["tokens_seen"]
    a, b = load_checkpoint(single / "checkpoint.pt"), load_checkpoint(multi / "checkpoint.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())


def test_torchrun_compare_writes_one_report(corpus_file, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    args = _train_args(corpus_file, tmp_path, 2, "adamw")
    args[args.index("train")] = "compare"
    args += ["--methods", "adamw", "sam", "--seeds", "0"]
    subprocess.run([*TORCHRUN, *args], check=True, env=env, timeout=300)
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.json").is_file()
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["summary"]) == {"adamw", "sam"}
    for method in ("adamw", "sam"):
        result = json.loads((tmp_path / "runs" / f"{method}-s0" / "result.json").read_text())
        assert result["status"] == "completed" and result["step"] == 4
