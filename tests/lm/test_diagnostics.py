"""Sharpness in training runs: logging leaves the trajectory alone; final figure; train_tokens."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from flatlm.lm.checkpoint import CheckpointError, load_trained
from flatlm.lm.config import ConfigError, load_config
from flatlm.lm.data import prepare_corpus, train_split
from flatlm.lm.diagnostics import (
    checkpoint_sharpness,
    double_backward_attention,
    ranks_steps,
    run_rho,
)
from flatlm.lm.evaluate import fixed_batches, lm_loss
from flatlm.lm.train import make_optimizer, train
from flatlm.sharpness import quick_sharpness, sharpness_report


@pytest.fixture(autouse=True)
def one_thread():
    """The references below run outside ``train`` (which sets train.threads=1): match it, since
    2 OpenMP threads on the busy 2-core test machine made the Hessian products ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sharpness_logging_keeps_the_trajectory(tiny_cfg, tmp_path):
    # dropout: the training RNG matters, so a consumed random number would change the end point
    base = dict(optim__method="sam", model__dropout=0.1)
    plain = train(tiny_cfg(**base), tmp_path / "a", quiet=True)
    logged = train(
        tiny_cfg(**base, train__sharpness_every=2, train__sharpness_iters=4),
        tmp_path / "b",
        quiet=True,
    )
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged["val_loss"] == plain["val_loss"] and logged["test_loss"] == plain["test_loss"]
    rows = [r for r in _records(tmp_path / "b") if r["split"] == "sharpness"]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    for r in rows:
        assert r["hessian.lambda_max"] > 0 and math.isfinite(r["sam.logit_functional_ratio"])
    with open(tmp_path / "b" / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert {"hessian.lambda_max", "sam.logit_functional_ratio"} <= set(table[0])
    assert [float(r["hessian.lambda_max"]) for r in table if r["split"] == "sharpness"] == [
        r["hessian.lambda_max"] for r in rows
    ]
    assert "hessian.lambda_max" not in (tmp_path / "a" / "metrics.csv").read_text()


def test_final_sharpness_matches_quick_sharpness(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        train__sharpness_final=True, train__sharpness_iters=3, train__sharpness_batches=2
    )
    result = train(cfg, tmp_path, quiet=True)
    final = result["final_sharpness"]
    assert final["lanczos_iters"] == 6 and final["windows"] == 2 * cfg.train.batch_size
    # the same figure recomputed from the checkpoint on the same fixed training windows
    model, cfg2, corpus, _ = load_trained(tmp_path)
    data = train_split(corpus, cfg2.data)
    batches = fixed_batches(data, 2, cfg.train.batch_size, cfg.model.block_size, "train", "cpu")
    with double_backward_attention():
        ref = quick_sharpness(model, lm_loss, batches, lanczos_iters=6, rho=0.05)
    assert final["hessian.lambda_max"] == pytest.approx(ref["hessian.lambda_max"], rel=1e-6)
    assert final["sam.logit_functional_ratio"] == pytest.approx(
        ref["sam.logit_functional_ratio"], rel=1e-6
    )


def test_checkpoint_sharpness_equals_direct_report(tiny_cfg, tmp_path):
    train(tiny_cfg(train__steps=2), tmp_path, quiet=True)
    report = checkpoint_sharpness(
        tmp_path, splits=("val",), batches=1, what=("hessian",), lanczos_iters=5
    )
    model, _, corpus, _ = load_trained(tmp_path / "checkpoint.pt")
    batches = fixed_batches(corpus.splits["val"], 1, 4, 16, "val", "cpu")
    with double_backward_attention():
        ref = sharpness_report(model, lm_loss, batches, what=("hessian",), lanczos_iters=5)
    assert report["figures"]["val"] == ref and report["step"] == 2
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint_sharpness(tmp_path / "nowhere")


def test_train_tokens_limits_the_training_split(tiny_cfg, tmp_path):
    cfg = tiny_cfg(data__train_tokens=500)
    corpus = prepare_corpus(cfg.data)
    data = train_split(corpus, cfg.data)
    assert len(data) == 500 and np.array_equal(data, corpus.splits["train"][-500:])
    result = train(cfg, tmp_path, quiet=True)
    assert result["train_tokens"] == 500
    assert result["epochs"] == pytest.approx(6 * 4 * 16 / 500)
    with pytest.raises(ConfigError, match=r"'data\.train_tokens'"):
        tiny_cfg(data__train_tokens=10)  # not even one window of block_size + 1


def test_method_typos_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"'optim.method'.*unknown method 'fsma'"):
        load_config(overrides={"optim.method": "fsma"})
    with pytest.raises(ConfigError, match=r"'compare.methods\[1\]'.*bad method option"):
        load_config(overrides={"compare.methods": ["adamw", "gasam:alpha"]})
    cfg = load_config(overrides={"compare.methods": ["adamw", "gasam:alpha=-1,ascent_steps=2"]})
    assert cfg.compare.methods[1] == "gasam:alpha=-1,ascent_steps=2"


@pytest.mark.parametrize(
    ("overrides", "rho"),
    [
        ({"optim.method": "sam:rho=1.0"}, 1.0),  # in the name: what the optimizer is built with
        ({"optim.method": "sam:rho=1.0", "optim.rho": 0.2}, 1.0),
        ({"optim.method": "sam", "optim.rho": 0.2}, 0.2),
        ({"optim.method": "gasam", "optim.method_kwargs": {"gasam": {"rho": 0.3}}}, 0.3),
        ({"optim.method": "asam"}, 0.5),  # the method's own default (registry.default_rho)
        ({"optim.method": "adamw"}, 0.05),  # SAM's default, for AdamW's decomposition
    ],
)
def test_the_logged_rho_is_the_one_the_method_was_built_with(overrides, rho):
    cfg = load_config(overrides=overrides)
    assert run_rho(cfg) == rho
    if overrides["optim.method"] != "adamw":
        opt = make_optimizer(torch.nn.Linear(2, 2), cfg.optim, grad_clip=1.0)
        assert all(g["rho"] == rho for g in opt.param_groups)


def test_tokens_seen_count_every_rank_and_each_resume_s_number_of_ranks():
    # batch_size is per rank: 10 steps on 2 ranks are 20 rank-steps; saved at step 4 on 2 ranks
    # and resumed on 1: 4 x 2 + 6 x 1 = 14 (and back to 3 ranks at step 7: 4x2 + 3x1 + 3x3 = 20).
    assert ranks_steps(10, 1) == 10
    assert ranks_steps(10, 2) == 20
    to_one = {"step": 4, "key": "world_size", "was": 2, "now": 1}
    assert ranks_steps(10, 1, [to_one]) == 14
    other = {"step": 5, "key": "train.steps", "was": 8, "now": 10}
    to_three = {"step": 7, "key": "world_size", "was": 1, "now": 3}
    assert ranks_steps(10, 3, [to_three, other, to_one]) == 20
