"""Tiny randomly initialised Hugging Face models and synthetic data for the HF tests (importable
by spawned processes; nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 64


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_data(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Arithmetic sequences mod VOCAB: a pattern a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (1,), generator=g)
        ids = (start + 3 * torch.arange(length)) % VOCAB
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows
