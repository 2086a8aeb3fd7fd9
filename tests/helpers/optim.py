"""Small models, a spy base optimizer and reference maths shared by the optimizer tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    """Two layers with a tanh: J depends on θ, so Functional-SAM differs from SAM here."""

    def __init__(self, d_in: int = 5, d_hidden: int = 7, n_out: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, n_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_mlp(seed: int = 0, dtype=torch.float64, **kw) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kw).to(dtype)


def make_batch(seed: int = 1, n: int = 16, d_in: int = 5, n_out: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_out, (n,), generator=g)
    return x, y


def ce(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits, y)


def make_spy(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``base`` that records the parameters and gradients it steps with."""

    class Spy(base):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.seen_params: list[list[torch.Tensor]] = []
            self.seen_grads: list[list[torch.Tensor | None]] = []

        @torch.no_grad()
        def step(self, closure=None):
            ps = [p for g in self.param_groups for p in g["params"]]
            self.seen_params.append([p.detach().clone() for p in ps])
            self.seen_grads.append([None if p.grad is None else p.grad.clone() for p in ps])
            return super().step(closure)

    Spy.__name__ = f"Spy{base.__name__}"
    return Spy


SpySGD = make_spy(torch.optim.SGD)
SpyAdamW = make_spy(torch.optim.AdamW)


def poisoned_forward(model: nn.Module, x: torch.Tensor, bad_call: int, value: float = float("nan")):
    """forward() whose logits are multiplied by ``value`` (NaN, inf) on call number ``bad_call``
    (0 the clean pass, 1 the perturbed one)."""
    calls = {"n": 0}

    def forward() -> torch.Tensor:
        out = model(x)
        if calls["n"] == bad_call:
            out = out * value
        calls["n"] += 1
        return out

    return forward


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()
