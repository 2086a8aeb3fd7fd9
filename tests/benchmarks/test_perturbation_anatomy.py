"""benchmarks/perturbation_anatomy.py on a psam checkpoint: its loss increases for a small ρ
must be the first-order closed forms ρ‖g‖ (SAM) and ρ g·P⁻¹g/‖P⁻¹g‖ (preconditioned), with P
rebuilt here from the checkpoint's AdamW moments and this gradient (this step's moment)."""

from __future__ import annotations

import pytest
import torch

from flatlm.lm.checkpoint import load_trained
from flatlm.lm.config import load_config
from flatlm.lm.data import train_split
from flatlm.lm.evaluate import fixed_batches, lm_loss
from flatlm.lm.train import param_groups as make_param_groups
from flatlm.lm.train import train
from helpers.scripts import load_benchmark

anatomy = load_benchmark("perturbation_anatomy")


def test_anatomy_of_a_psam_checkpoint_matches_the_first_order_closed_forms(
    tmp_path, corpus_file, monkeypatch
):
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        overrides={
            "model.size": "micro",
            "model.block_size": 16,
            "data.corpus": str(corpus_file),
            "data.tokenizer": "char",
            "optim.method": "psam:rho=0.1",
            "train.steps": 4,
            "train.batch_size": 4,
            "train.warmup_steps": 1,
            "train.eval_every": 0,
            "train.eval_batches": 1,
            "train.test_batches": 1,
            "train.threads": 1,
        }
    )
    run = tmp_path / "run"
    train(cfg, run, quiet=True)
    rho = 1e-3
    out = anatomy.anatomy(str(run), [rho], batch_size=4)

    # The same weights and batch, the gradient and P = √v̂ + eps computed here.
    model, cfg, corpus, ckpt = load_trained(run)
    ((x, y),) = fixed_batches(train_split(corpus, cfg.data), 1, 4, 16, "train", "cpu")
    lm_loss(model(x), y).backward()
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params]).double()
    # AdamW's own moments, restored by torch's load_state_dict (not by flatlm's preconditioner):
    # the checkpoint is in torch's layout, flatlm's entries (flatlm_*) are extra keys to AdamW
    base = torch.optim.AdamW(make_param_groups(model, cfg.optim.weight_decay))
    base.load_state_dict(ckpt["optimizer"])
    precond = []
    for p in params:
        group = next(g for g in base.param_groups if any(q is p for q in g["params"]))
        st, beta2 = base.state[p], group["betas"][1]
        v = beta2 * st["exp_avg_sq"].double() + (1 - beta2) * p.grad.double() ** 2
        v_hat = v / (1 - beta2 ** (float(st["step"]) + 1))
        precond.append((v_hat.sqrt() + group["eps"]).reshape(-1))
    u = g / torch.cat(precond)
    expected = {"sam": rho * float(g.norm()), "psam": rho * float(g @ u / u.norm())}
    for name, first_order in expected.items():
        assert out[name]["loss_increase"][f"{rho:g}"] == pytest.approx(first_order, rel=0.05)
        for key in ("share_absent_token_rows", "share_embedding", "share_top_1pct_coordinates"):
            assert 0.0 <= out[name][key] <= 1.0
    assert expected["psam"] < expected["sam"]  # Cauchy–Schwarz: ⟨g, û⟩ ≤ ‖g‖
    present = torch.cat([x.reshape(-1), y.reshape(-1)]).unique().numel()
    assert out["absent_token_rows"] == corpus.vocab_size - present
