"""The LM loss and scoring on fixed windows: what training, the regime figures and the sharpness
diagnostics all measure, in one place below them (so none of them imports another for it)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.lm.data import eval_batches

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy per token (in fp32 whatever the autocast dtype)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


def fixed_batches(
    data: np.ndarray, n_batches: int, batch_size: int, block_size: int, split: str, device: Any
) -> Batches:
    """Evenly spaced windows (the same for every method, seed and call), on ``device``."""
    return [
        (x.to(device), y.to(device))
        for x, y in eval_batches(data, n_batches, batch_size, block_size, split)
    ]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> float:
    """Mean per-token cross-entropy over fixed batches (eval mode: no dropout, no RNG use)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(x.device):
            logits = model(x)
        total += lm_loss(logits, y, reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count
