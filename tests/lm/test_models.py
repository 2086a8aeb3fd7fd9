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


def test_asam_puts_almost_all_of_epsilon_on_the_biases_and_gains_of_a_gpt(tiny_cfg):
    # docs/algorithms.md (ASAM): the workbench's tiny GPT at step 1, one batch of text, ASAM as
    # published (T = |w| + 0.01 on matrices, T = 1 on biases and norm gains, ρ = 0.5). T ≈ 0.03
    # on the matrices shrinks their share of ε = ρT²g/‖Tg‖ by T², so ‖ε‖ lies almost wholly on
    # the 1-D tensors: measured 0.49988 of ρ there and 3.7e-4 on the matrices (char tokens;
    # 0.49989 and 3.5e-4 with the default 4096-token BPE).
    import numpy as np
    import torch.nn.functional as F

    from flatlm.lm.data import prepare_corpus
    from flatlm.optim import create

    cfg = tiny_cfg(model__size="tiny", model__block_size=128)
    corpus = prepare_corpus(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.model, corpus.vocab_size)
    data = np.asarray(corpus.splits["train"], dtype=np.int64)
    starts = np.arange(8) * 1000
    x = torch.tensor(np.stack([data[s : s + 128] for s in starts]))
    y = torch.tensor(np.stack([data[s + 1 : s + 129] for s in starts]))
    params = list(model.parameters())
    opt = create("asam", params, lr=1e-3)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    eps = opt.perturbation()
    on_vectors = sum(float((e**2).sum()) for p, e in zip(params, eps, strict=True) if p.dim() < 2)
    on_matrices = sum(float((e**2).sum()) for p, e in zip(params, eps, strict=True) if p.dim() > 1)
    assert opt.param_groups[0]["rho"] == 0.5
    assert on_vectors**0.5 > 0.999 * 0.5
    assert on_matrices**0.5 < 2e-3 * 0.5
