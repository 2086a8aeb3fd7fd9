"""Language models for the workbench: a GPT-style Transformer and an LSTM, both ``idx -> logits``.

Parameter counts (GPT, block_size 128, tied embeddings; the embedding share grows with vocab):

=========  =======  ======  ======  ===============  ===============
size       n_layer  n_head  n_embd  vocab 89 (char)  vocab 4096 (BPE)
=========  =======  ======  ======  ===============  ===============
micro      2        2       64      0.11 M           0.37 M
tiny       2        4       128     0.42 M           0.94 M
small      4        4       256     3.2 M            4.2 M
medium     6        6       384     10.7 M           12.3 M
large      8        8       512     25.3 M           27.4 M
xl         12       12      576     48.0 M           50.3 M
=========  =======  ======  ======  ===============  ===============

LSTM sizes (``n_layer`` x hidden = embedding, tied): micro 1x128, tiny 2x256, small 2x512,
medium 2x650 (Zaremba et al.'s medium), large 2x1024. ``flatlm.lm.models.count_params`` gives exact
numbers for any config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flatlm.lm.config import GPT_SIZES as GPT_SIZES  # the named sizes, defined with the config
from flatlm.lm.config import LSTM_SIZES as LSTM_SIZES
from flatlm.lm.config import ModelConfig
from flatlm.lm.config import resolve_dims as resolve_dims


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only Transformer with learned positions and tied input/output embeddings."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied
        self.apply(self._init)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so depth does not blow up.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq_len = idx.shape[1]
        if seq_len > self.block_size:
            raise ValueError(f"sequence length {seq_len} exceeds block_size {self.block_size}")
        pos = torch.arange(seq_len, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class LSTMLM(nn.Module):
    """Multi-layer LSTM LM with dropout and tied embeddings (the GA-SAM paper's setting).

    Each batch starts from a zero state (no state carried across batches), so batches are
    independent and training is resumable and order-controlled like the GPT's.
    """

    def __init__(self, vocab_size: int, n_layer: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden)
        self.drop = nn.Dropout(dropout)
        inner = dropout if n_layer > 1 else 0.0  # between LSTM layers; torch warns for one layer
        self.lstm = nn.LSTM(hidden, hidden, n_layer, batch_first=True, dropout=inner)
        self.head = nn.Linear(hidden, vocab_size)
        self.head.weight = self.wte.weight  # tied
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.drop(self.wte(idx)))
        return self.head(self.drop(out))


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    dims = resolve_dims(cfg)
    if cfg.arch == "gpt":
        return GPT(vocab_size, cfg.block_size, dropout=cfg.dropout, **dims)
    return LSTMLM(vocab_size, dims["n_layer"], dims["n_embd"], dropout=cfg.dropout)


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
