"""benchmarks/overhead.py: the memory accounting, the perturb_every variants and the
pytorch_optimizer comparison, on a model small enough for the test suite (timings not checked)."""

from __future__ import annotations

import argparse

import pytest
import torch

from helpers.scripts import load_benchmark

overhead = load_benchmark("overhead")
SMALL = ["--sizes", "micro", "--batch", "2", "--seq", "16", "--vocab", "64"]
FAST = ["--repeats", "2", "--steps", "2", "--warmup", "0", "--threads", "1"]


def test_rows_for_every_method_with_the_memory_each_must_keep(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    methods = ["adamw", "sam", "gasam", "fsam", "sam:perturb_every=2", "msam", "mfsam"]
    methods += ["wsam", "gsam", "friendlysam", "gcsam", overhead.BSAM]
    rows = overhead.main([*SMALL, *FAST, "--methods", *methods, "--json", str(tmp_path / "o.json")])
    by_method = {r["method"]: r for r in rows}
    assert list(by_method) == [*methods, "pto-sam"]  # pytorch_optimizer's SAM joins the run
    # between steps: one clean copy of θ; GA-SAM its EMA as well; perturb_every the direction
    # (msam and mfsam keep the clean copy too: θ is restored from it, never by subtracting ε)
    copies = {"adamw": 0, "sam": 1, "gasam": 2, "fsam": 1, "sam:perturb_every=2": 2, "pto-sam": 0}
    copies |= {"msam": 1, "mfsam": 1}
    # WSAM and GSAM hold the clean gradient only within a step; FriendlySAM keeps its EMA
    copies |= {"wsam": 1, "gsam": 1, "friendlysam": 2, "gcsam": 1}
    # bSAM: the clean copy (its m and s are its base optimizer's, as AdamW's two moments)
    copies |= {overhead.BSAM: 1}
    for method, n in copies.items():  # (GA-SAM also keeps a scalar step count per tensor)
        assert by_method[method]["extra_param_copies"] == pytest.approx(n, abs=1e-3), method
    logits = 2 * 16 * 64 * 4  # batch x seq x vocab float32
    assert by_method["fsam"]["transient_dlogits_bytes"] == logits
    assert by_method["sam"]["transient_dlogits_bytes"] == 0
    assert by_method["mfsam"]["transient_dlogits_bytes"] == logits
    assert by_method["adamw"]["x_adamw"] == 1.0
    assert by_method["pto-sam"]["sam_over_this"] > 0
    assert all(r["step_ms"] > 0 for r in rows)
    assert (tmp_path / "o.json").is_file()


def test_flatlm_and_pytorch_optimizer_sam_reach_the_same_parameters():
    pytest.importorskip("pytorch_optimizer")
    args = argparse.Namespace(batch=2, seq=16, vocab=64)
    parity = overhead.parity_with_pytorch_optimizer("micro", args, torch.device("cpu"))
    # relative to the distance moved: float32 rounding, and float64 limited by pytorch_optimizer
    # taking the gradient norm in float32
    assert parity["float32"] < 1e-4
    assert parity["float64"] < 1e-5


def test_a_bad_method_name_fails_before_anything_runs():
    with pytest.raises(ValueError, match="unknown method"):
        overhead.main([*SMALL, *FAST, "--methods", "nosuch"])
