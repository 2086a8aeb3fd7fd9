"""The preconditioned direction on coordinates AdamW has not seen (an untied embedding row of a
token appearing for the first time), with this step's second moment (the default) and with the
previous one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.optim import PreconditionedFunctionalSAM, PreconditionedSAM

VOCAB, DIM, NEW_TOKEN, BETA2 = 24, 8, 21, 0.999


class UntiedLM(nn.Module):
    """Embedding and output head as separate weights (Llama-style, tie_word_embeddings=False)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(idx))))


def _batch(step: int, with_new_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 12, (8, 6), generator=g)  # tokens 0..11 only
    if with_new_token:
        idx[0, 2] = NEW_TOKEN  # its embedding row gets a gradient for the first time
    return idx[:, :-1], idx[:, 1:]


def _loss(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def _eps_at_new_token(cls, moment: str, warmup: int):
    torch.manual_seed(0)
    model = UntiedLM().double()
    opt = cls(model.parameters(), rho=0.1, lr=1e-2, betas=(0.9, BETA2), moment=moment)
    for k in range(warmup):
        x, y = _batch(k, with_new_token=False)
        opt.step(forward=lambda x=x: model(x), loss_fn=_loss(y))
    x, y = _batch(99, with_new_token=True)
    model.zero_grad()
    _loss(y)(model(x)).backward()
    eps = opt.perturbation()
    return model, opt, eps


def _history_masks(model, opt) -> list[torch.Tensor]:
    """Per parameter, the coordinates with a gradient now but no AdamW history (v = 0)."""
    masks = []
    for p in model.parameters():
        v = opt.base_optimizer.state[p]["exp_avg_sq"]
        masks.append((v == 0) & (p.grad != 0))
    return masks


def _share(eps, masks) -> float:
    total = sum(float((e**2).sum()) for e in eps)
    return sum(float((e[m] ** 2).sum()) for e, m in zip(eps, masks, strict=True)) / total


@pytest.mark.parametrize("cls", [PreconditionedSAM, PreconditionedFunctionalSAM])
@pytest.mark.parametrize("warmup", [1, 4])
def test_a_token_seen_for_the_first_time_does_not_take_over_the_perturbation(cls, warmup):
    model, opt, eps = _eps_at_new_token(cls, "current", warmup)
    # The bound of this step's moment: |P⁻¹g| ≤ √(1 − β₂ᵗ⁺¹)/√(1 − β₂) per coordinate
    # (1 for a coordinate without history).
    scale = 0.1 / math.sqrt(sum(float((e**2).sum()) for e in eps))  # ε = ρ u/‖u‖
    for p, e in zip(model.parameters(), eps, strict=True):
        t = opt.base_optimizer.state[p]["step"].item()
        bound = math.sqrt(1 - BETA2 ** (t + 1)) / math.sqrt(1 - BETA2)
        assert (e / scale).abs().max().item() <= bound * (1 + 1e-9)
    new = _history_masks(model, opt)
    assert new[0][NEW_TOKEN].all()  # the new token's embedding row is among them
    assert _share(eps, new) < 0.2  # measured 0.11 (warmup 1 and 4)

    # With the previous moment P = eps = 1e-8 there, and those coordinates take all of ε.
    model_prev, opt_prev, eps_prev = _eps_at_new_token(cls, "previous", warmup)
    assert _share(eps_prev, _history_masks(model_prev, opt_prev)) > 0.999


@pytest.mark.parametrize("warmup", [1, 4])
def test_on_coordinates_with_history_the_direction_stays_the_preconditioned_one(warmup):
    # ε restricted to the coordinates AdamW has seen is P_t⁻¹g there (this step's moment, by
    # hand), and keeps most of ε's length; with the previous moment it all but vanishes.
    model, opt, eps = _eps_at_new_token(PreconditionedSAM, "current", warmup)
    new = _history_masks(model, opt)
    got, want = [], []
    for p, e, m in zip(model.parameters(), eps, new, strict=True):
        state = opt.base_optimizer.state[p]
        v = BETA2 * state["exp_avg_sq"] + (1 - BETA2) * p.grad**2
        vhat = v / (1 - BETA2 ** (state["step"].item() + 1))
        got.append(e[~m])
        want.append((p.grad / (vhat.sqrt() + 1e-8))[~m])
    a, b = torch.cat(got), torch.cat(want)
    assert float(a @ b / (a.norm() * b.norm())) > 1 - 1e-12
    assert 1 - _share(eps, new) > 0.8

    model_prev, opt_prev, eps_prev = _eps_at_new_token(PreconditionedSAM, "previous", warmup)
    assert 1 - _share(eps_prev, _history_masks(model_prev, opt_prev)) < 1e-6
