"""Train a tiny character-level model with AdamW and each flatlm method; print losses.

The smallest end-to-end use of the optimizer API (`flatlm compare` is the full workbench).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import flatlm

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
) * 4


class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int = 8, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(context * dim, 128)
        self.head = nn.Linear(128, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(idx).flatten(1))))


def train_step(opt: torch.optim.Optimizer, model: nn.Module, xb, yb) -> torch.Tensor:
    if isinstance(opt, flatlm.optim.SharpnessAwareOptimizer):
        return opt.step(forward=lambda: model(xb), loss_fn=lambda z: F.cross_entropy(z, yb))
    opt.zero_grad()
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    return loss


def main(steps: int = 150) -> None:
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    context = 8
    windows = data.unfold(0, context + 1, 1)
    x, y = windows[:, :-1], windows[:, -1]
    for name in flatlm.optim.METHODS:
        torch.manual_seed(0)
        model = CharMLP(len(chars), context)
        opt = flatlm.optim.create(name, model.parameters(), lr=3e-3, weight_decay=0.01)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = train_step(opt, model, x[idx], y[idx])
        with torch.no_grad():
            full = F.cross_entropy(model(x), y).item()
        print(f"{name:>6}: last batch loss {loss.item():.4f}   full-text loss {full:.4f}")


if __name__ == "__main__":
    main()
