"""Training: resume is bit-exact, checkpoints fail clearly, schedule and init are shared."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import flatlm.lm.train as train_mod
from flatlm.lm.checkpoint import CheckpointError
from flatlm.lm.models import build_model
from flatlm.lm.train import lr_lambda, param_groups, train


def _params(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["adamw", "pfsam"])
def test_resume_equals_uninterrupted_run(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(optim__method=method, model__dropout=0.1)  # dropout: RNG state must resume too
    straight = train(cfg, tmp_path / "a", quiet=True)
    part = train(cfg, tmp_path / "b", quiet=True, stop_after=3)
    assert part["status"] == "stopped" and part["step"] == 3
    resumed = train(cfg, tmp_path / "b", quiet=True, resume=True)
    assert resumed["step"] == straight["step"] == 6
    _assert_same_params(_params(tmp_path / "a"), _params(tmp_path / "b"))
    assert resumed["val_loss"] == straight["val_loss"]
    assert resumed["test_loss"] == straight["test_loss"]
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # the log holds both halves


def _losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in records]


def test_sigint_checkpoints_and_resume_continues(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg()
    straight = train(cfg, tmp_path / "a", quiet=True)
    real_step, calls = train_mod.train_step, []

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does; handled, not raised
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where started in the background (nohup &)
    part = train(cfg, tmp_path / "b", quiet=True)
    assert part["status"] == "interrupted" and part["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.setattr(train_mod, "train_step", real_step)
    train(cfg, tmp_path / "b", quiet=True, resume=True)
    _assert_same_params(_params(tmp_path / "a"), _params(tmp_path / "b"))
    assert straight["status"] == "completed"


def test_truncated_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=2)
    train(cfg, tmp_path, quiet=True)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, tmp_path, quiet=True, resume=True)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(cfg, tmp_path, quiet=True, resume=True)
    path.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, tmp_path, quiet=True, resume=True)


def test_mismatched_checkpoint_names_the_difference(tiny_cfg, tmp_path):
    train(tiny_cfg(train__steps=2), tmp_path, quiet=True)
    with pytest.raises(CheckpointError, match=r"model\.n_embd is 64 in the checkpoint but 32 now"):
        train(tiny_cfg(train__steps=4, model__n_embd=32), tmp_path, quiet=True, resume=True)
    with pytest.raises(CheckpointError, match=r"optim\.method is 'adamw'"):
        train(tiny_cfg(train__steps=4, optim__method="sam"), tmp_path, quiet=True, resume=True)


def test_same_init_and_data_order_for_every_method(tiny_cfg):
    def init(**overrides):
        run, _ = train_mod._init_run(tiny_cfg(**overrides), 50, torch.device("cpu"), 1)
        return run.model.state_dict(), torch.randint(1000, (4,), generator=run.sampler)

    params_a, batch_a = init(optim__method="adamw")
    params_b, batch_b = init(optim__method="fsam")
    _assert_same_params(params_a, params_b)
    assert torch.equal(batch_a, batch_b)
    params_c, batch_c = init(train__seed=1)
    assert not torch.equal(params_a["wte.weight"], params_c["wte.weight"])
    assert not torch.equal(batch_a, batch_c)


def test_run_outputs_and_metrics(tiny_cfg, tmp_path):
    result = train(tiny_cfg(optim__method="sam"), tmp_path, quiet=True)
    assert result["status"] == "completed" and result["skipped_steps"] == 0
    assert math.isfinite(result["val_loss"]) and result["val_ppl"] == pytest.approx(
        math.exp(result["val_loss"])
    )
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["split"] == "test" and records[-1]["loss"] == result["test_loss"]
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,split,loss,ppl,lr,elapsed_s" and len(csv_lines) == len(records) + 1
    first_val = next(r for r in records if r["split"] == "val")["loss"]
    # near-uniform predictions at init: loss ~ log(vocab)
    assert first_val == pytest.approx(math.log(result["vocab_size"]), rel=0.05)
    assert json.loads((tmp_path / "result.json").read_text()) == result


def test_warmup_cosine_schedule(tiny_cfg):
    cfg = tiny_cfg(train__steps=110, train__warmup_steps=10, train__min_lr_ratio=0.1).train
    f = lr_lambda(cfg)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_embeddings(tiny_cfg):
    model = build_model(tiny_cfg().model, 50)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.startswith(("wte", "wpe")) or "ln" in n or n.endswith("bias") for n in decayed)
    n_all = sum(p.numel() for p in model.parameters())
    assert n_all == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_method_kwargs_apply_to_a_method_and_its_named_variants(tiny_cfg):
    from flatlm.lm.models import build_model
    from flatlm.lm.train import make_optimizer

    cfg = tiny_cfg(optim__method="gasam:ascent_steps=2")
    cfg.optim.method_kwargs = {"gasam": {"alpha": 0.25, "ascent_steps": 3}}
    opt = make_optimizer(build_model(cfg.model, 50), cfg.optim, grad_clip=1.0)
    assert opt.direction.alpha == 0.25  # from the table
    assert opt.ascent_steps == 2  # the name's option wins


def test_the_results_numbers_against_hand_computations(tiny_cfg, tmp_path):
    """result.json's losses and regime figures, and the first logged training loss and every
    logged learning rate, recomputed here: the trained weights on each split's evenly spaced
    windows (written out with numpy, the loss in float64), the first batch drawn from the run's
    own seeded sampler at the initial weights, the schedule's closed form. The validation
    split's loss is far from the test split's, so a swapped split cannot pass."""
    import numpy as np
    import torch.nn.functional as F

    from flatlm.lm.checkpoint import load_trained

    cfg = tiny_cfg(train__test_batches=3, train__eval_batches=3)
    tc, block = cfg.train, cfg.model.block_size
    result = train(cfg, tmp_path, quiet=True)
    model, _, corpus, _ = load_trained(tmp_path)
    model.eval()
    n = tc.test_batches * tc.batch_size  # = eval_batches * batch_size

    def windows(data, starts):
        x = torch.tensor(np.stack([data[s : s + block] for s in starts]))
        y = torch.tensor(np.stack([data[s + 1 : s + block + 1] for s in starts]))
        return x, y

    def loss_of(net, x, y) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(x).double().flatten(0, 1), y.flatten()))

    splits = {k: np.asarray(v, dtype=np.int64) for k, v in corpus.splits.items()}
    losses = {
        name: loss_of(model, *windows(data, np.linspace(0, len(data) - block - 1, n).astype(int)))
        for name, data in splits.items()
    }
    for name in ("test", "val", "train"):
        assert result[f"{name}_loss"] == pytest.approx(losses[name], rel=1e-6), name
    assert result["test_ppl"] == pytest.approx(math.exp(losses["test"]), rel=1e-6)
    assert abs(losses["test"] - losses["val"]) > 1e-3
    seen = tc.steps * tc.batch_size * block
    assert result["tokens_seen"] == seen and result["train_tokens"] == len(splits["train"])
    assert result["epochs"] == pytest.approx(seen / len(splits["train"]), rel=1e-12)

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if r["split"] == "train"}
    run, _ = train_mod._init_run(cfg, result["vocab_size"], torch.device("cpu"), 1)
    starts = torch.randint(len(splits["train"]) - block, (tc.batch_size,), generator=run.sampler)
    first = loss_of(run.model.eval(), *windows(splits["train"], starts.tolist()))
    assert logged[1]["loss"] == pytest.approx(first, rel=1e-6)  # AdamW: the loss at θ₀
    for step, record in logged.items():  # the lr of step s: warm-up, then cosine to 0.1 × lr
        k = step - 1
        if k < tc.warmup_steps:
            factor = (k + 1) / tc.warmup_steps
        else:
            progress = (k - tc.warmup_steps) / (tc.steps - tc.warmup_steps)
            r = tc.min_lr_ratio
            factor = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))
        assert record["lr"] == pytest.approx(cfg.optim.lr * factor, rel=1e-12), step
