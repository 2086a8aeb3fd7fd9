"""Models: causality, shapes, tied weights and the documented sizes."""

from __future__ import annotations

import pytest
import torch

from flatlm.lm.config import ModelConfig
from flatlm.lm.models import GPT, LSTMLM, build_model, count_params, resolve_dims

VOCAB = 50


def _models():
    torch.manual_seed(0)
    gpt = build_model(ModelConfig(arch="gpt", size="micro", block_size=12, dropout=0.1), VOCAB)
    lstm = build_model(ModelConfig(arch="lstm", size="micro", dropout=0.1), VOCAB)
    return {"gpt": gpt.eval(), "lstm": lstm.eval()}


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_future_tokens_do_not_change_past_logits(arch):
    model = _models()[arch]
    idx = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 12, VOCAB)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # the changed token does matter


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_tied_embeddings(arch):
    model = _models()[arch]
    assert model.head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names  # counted once


def test_documented_sizes():
    # the table in flatlm.lm.models (vocab 89 = the bundled corpus' characters + 2 specials)
    expect = {"micro": 0.11, "tiny": 0.42, "small": 3.22, "medium": 10.73, "large": 25.33}
    for size, millions in expect.items():
        model = build_model(ModelConfig(size=size, block_size=128), 89)
        assert round(count_params(model) / 1e6, 2) == millions
    xl = build_model(ModelConfig(size="xl", block_size=128), 4096)
    assert 45e6 < count_params(xl) < 55e6


def test_explicit_dims_override_size():
    cfg = ModelConfig(size="micro", n_layer=3, n_embd=48, n_head=3)
    assert resolve_dims(cfg) == {"n_layer": 3, "n_head": 3, "n_embd": 48}
    model = build_model(cfg, VOCAB)
    assert isinstance(model, GPT) and len(model.blocks) == 3
    lstm = build_model(ModelConfig(arch="lstm", n_layer=2, n_embd=32, size=""), VOCAB)
    assert isinstance(lstm, LSTMLM) and lstm.lstm.hidden_size == 32 and lstm.lstm.num_layers == 2
    with pytest.raises(ValueError, match="unknown gpt size 'huge'"):
        build_model(ModelConfig(size="huge"), VOCAB)


def test_gpt_rejects_too_long_input():
    model = _models()["gpt"]
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 13, dtype=torch.long))
