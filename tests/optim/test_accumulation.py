"""Gradient accumulation: M micro-batches in one step equal one step on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import METHODS, create
from helpers.optim import make_batch, make_mlp

SAM_METHODS = [m for m in METHODS if m != "adamw"]


@pytest.mark.parametrize("perturb_every", [1, 2])
@pytest.mark.parametrize("name", SAM_METHODS)
def test_micro_batches_equal_the_concatenated_batch(name, perturb_every):
    # With perturb_every=2 the second step reuses the first's direction (one pass, or for the
    # functional methods a no-grad clean forward per micro-batch plus one pass).
    batches = [make_batch(seed=s, n=24) for s in range(3)]
    kwargs = {"ascent_steps": 2} if name == "gasam" else {}
    kwargs["perturb_every"] = perturb_every
    big, acc = make_mlp(), make_mlp()
    opt_big = create(name, big.parameters(), rho=0.2, lr=0.01, **kwargs)
    opt_acc = create(name, acc.parameters(), rho=0.2, lr=0.01, **kwargs)
    for x, y in batches:
        loss_big = opt_big.step(forward=lambda: big(x), loss_fn=lambda z: F.cross_entropy(z, y))
        micro = list(zip(x.split(6), y.split(6), strict=True))  # M = 4
        loss_acc = opt_acc.step(
            forward=lambda mb: acc(mb[0]),
            loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
            micro_batches=micro,
        )
        torch.testing.assert_close(loss_acc, loss_big, rtol=1e-13, atol=0)
    for a, b in zip(acc.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_micro_batches_need_the_forward_protocol():
    model = make_mlp()
    opt = create("sam", model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match="need forward="):
        opt.step(lambda: None, micro_batches=[1])
    with pytest.raises(ValueError, match="empty"):
        opt.step(forward=lambda mb: model(mb), loss_fn=lambda z, mb: z.sum(), micro_batches=[])
