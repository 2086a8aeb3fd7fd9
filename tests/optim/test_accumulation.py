"""Gradient accumulation: M micro-batches in one step equal one step on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import create
from helpers.optim import PERTURB_EVERY_CASES, GasamReference, make_batch, make_mlp, params_of


@pytest.mark.parametrize(("name", "perturb_every"), PERTURB_EVERY_CASES)
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


def _full_batch_grad(model, x, y):
    """∇ of the mean cross-entropy over the whole batch at a point (functional; model untouched)."""
    names = [n for n, _ in model.named_parameters()]

    def grad_at(point):
        ts = [t.detach().clone().requires_grad_() for t in point]
        logits = torch.func.functional_call(model, dict(zip(names, ts, strict=True)), (x,))
        return list(torch.autograd.grad(F.cross_entropy(logits, y), ts))

    return grad_at


def test_gasam_unnormalized_micro_batches_weight_the_clean_losses():
    # SAM, ASAM, PSAM and GA-SAM with normalize=True or the default Euclidean radius make the
    # same ε from g and from M·g, so they cannot tell whether the clean micro-batch losses were
    # weighted by 1/M. GA-SAM(normalize=False, radius="ellipsoid") can: D carries
    # clip(RMS(s)^α) of the clean gradient's overall strength (and the EMA keeps its square),
    # and the ellipsoid's ε = ρD²g/‖Dg‖ keeps D's overall scale, so an unweighted clean pass
    # changes ε by about M^α and every later step.
    m, rho, lr, beta = 4, 0.2, 0.05, 0.9
    options = dict(rho=rho, lr=lr, alpha=-1.0, beta=beta, normalize=False, radius="ellipsoid")
    batches = [make_batch(seed=s, n=24) for s in range(3)]
    big, acc, unweighted = make_mlp(), make_mlp(), make_mlp()
    opt_big = create("gasam", big.parameters(), base_optimizer=torch.optim.SGD, **options)
    opt_acc = create("gasam", acc.parameters(), base_optimizer=torch.optim.SGD, **options)
    opt_unw = create("gasam", unweighted.parameters(), base_optimizer=torch.optim.SGD, **options)
    ref_options = dict(alpha=-1.0, beta=beta, normalize=False, radius="ellipsoid")
    reference = GasamReference(rho, **ref_options)
    reference_unweighted = GasamReference(rho, clean_grad_scale=m, **ref_options)
    theta0 = params_of(big)
    theta, theta_unw = list(theta0), list(theta0)

    calls = {"n": 0}

    def unweighted_loss(z, mb):
        # What an implementation that forgets the 1/M on the clean pass computes: the first M
        # loss calls of a step are the clean ones; M·loss there cancels the engine's 1/M.
        clean = calls["n"] % (2 * m) < m
        calls["n"] += 1
        return F.cross_entropy(z, mb[1]) * (m if clean else 1)

    for x, y in batches:
        micro = list(zip(x.split(24 // m), y.split(24 // m), strict=True))
        opt_big.step(forward=lambda x=x: big(x), loss_fn=lambda z, y=y: F.cross_entropy(z, y))
        opt_acc.step(
            forward=lambda mb: acc(mb[0]),
            loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
            micro_batches=micro,
        )
        opt_unw.step(
            forward=lambda mb: unweighted(mb[0]), loss_fn=unweighted_loss, micro_batches=micro
        )
        descent, _ = reference.step(theta, _full_batch_grad(big, x, y))
        theta = [t - lr * g for t, g in zip(theta, descent, strict=True)]
        descent, _ = reference_unweighted.step(theta_unw, _full_batch_grad(big, x, y))
        theta_unw = [t - lr * g for t, g in zip(theta_unw, descent, strict=True)]

    for a, b, want in zip(acc.parameters(), big.parameters(), theta, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(a.detach(), want, rtol=1e-10, atol=1e-13)
    # The unweighted variant, through the engine and by hand, lands elsewhere: the check can fail.
    for a, want in zip(unweighted.parameters(), theta_unw, strict=True):
        torch.testing.assert_close(a.detach(), want, rtol=1e-10, atol=1e-13)
    moved = max(float((t - t0).abs().max()) for t, t0 in zip(theta, theta0, strict=True))
    gap = max(float((t - u).abs().max()) for t, u in zip(theta, theta_unw, strict=True))
    assert gap > 0.1 * moved, (gap, moved)
