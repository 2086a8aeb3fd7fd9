"""flatlm's SAM and ASAM against an independent implementation: pytorch_optimizer's SAM."""

from __future__ import annotations

import pytest
import torch

from flatlm.optim import SAM
from helpers.optim import ce, make_batch, make_mlp

pto = pytest.importorskip("pytorch_optimizer", reason="the [bench] extra is not installed")


def _pto_step(opt, model, x, y):
    """pytorch_optimizer's documented protocol: clean backward, then step(closure)."""

    def closure():
        loss = ce(y)(model(x))
        loss.backward()
        return loss

    opt.zero_grad(set_to_none=True)
    closure()
    opt.step(closure)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_follow_pytorch_optimizer_over_several_steps(adaptive):
    # Their ASAM is T = |θ| (no η), and they take the norm in float32 and add 1e-12 to it; with
    # perturb_eps=0 and η=0 the only difference left is that float32 norm (relative 1e-7).
    batches = [make_batch(seed=s) for s in range(6)]
    ours, theirs = make_mlp(), make_mlp()
    start = [p.detach().clone() for p in ours.parameters()]
    opt = SAM(ours.parameters(), torch.optim.AdamW, rho=0.3, adaptive=adaptive, eta=0.0, lr=0.01)
    ref = pto.SAM(
        theirs.parameters(), torch.optim.AdamW, rho=0.3, adaptive=adaptive, perturb_eps=0.0, lr=0.01
    )
    for x, y in batches:
        opt.step(forward=lambda x=x: ours(x), loss_fn=ce(y))
        _pto_step(ref, theirs, x, y)
    with torch.no_grad():
        moved = torch.stack([(p - s).norm() for p, s in zip(ours.parameters(), start, strict=True)])
        diff = torch.stack(
            [(p - q).norm() for p, q in zip(ours.parameters(), theirs.parameters(), strict=True)]
        )
    assert moved.norm() > 0.01  # the comparison is about real steps
    assert diff.norm() / moved.norm() < 1e-6


def test_the_two_differ_when_rho_differs():
    # The comparison above can fail: a 10% different ρ moves the parameters measurably apart.
    ours, theirs = make_mlp(), make_mlp()
    opt = SAM(ours.parameters(), torch.optim.AdamW, rho=0.3, lr=0.01)
    ref = pto.SAM(theirs.parameters(), torch.optim.AdamW, rho=0.33, perturb_eps=0.0, lr=0.01)
    for s in range(6):
        x, y = make_batch(seed=s)
        opt.step(forward=lambda x=x: ours(x), loss_fn=ce(y))
        _pto_step(ref, theirs, x, y)
    diff = max(
        (p - q).abs().max() for p, q in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    assert diff > 1e-5
