"""Loss terms that bypass the logits (``forward`` returning ``(logits, aux)``), and the clear
errors for what ``forward`` and ``loss_fn`` may return."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from flatlm.optim import create
from helpers.optim import SpySGD, assert_bitwise_equal, ce, make_batch, make_mlp, params_of

LAMBDA = 0.3


def _aux(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """An L2 penalty on the first layer: depends on θ directly, not through the logits."""
    return LAMBDA * (params["fc1.weight"] ** 2).sum()


def _reference(model, x, y, rho: float, functional: bool) -> dict[str, torch.Tensor]:
    """g̃ by torch.func: ε from ∇(ℓ + aux) at θ; at θ+ε the full gradient of ℓ + aux (SAM), or
    J(θ+ε)ᵀ r(θ) + ∇aux(θ+ε) (the functional methods)."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def total(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y) + _aux(p)

    g = grad(total)(theta)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    shifted = {n: theta[n] + rho * g[n] / norm for n in theta}
    if not functional:
        return grad(total)(shifted)
    logits = functional_call(model, theta, (x,)).detach().requires_grad_()
    (r,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)

    def pullback(p):
        return (functional_call(model, p, (x,)) * r).sum() + _aux(p)

    return grad(pullback)(shifted)


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_an_aux_loss_returned_by_forward_is_in_the_update(name):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), base_optimizer=SpySGD, rho=0.4, lr=0.1)

    def forward():
        params = dict(model.named_parameters())
        return model(x), _aux(params)

    want = _reference(model, x, y, 0.4, functional=name != "sam")
    with torch.no_grad():
        clean = ce(y)(model(x)) + _aux(dict(model.named_parameters()))
    loss = opt.step(forward=forward, loss_fn=ce(y))
    got = opt.base_optimizer.seen_grads[0]
    for (n, _), g in zip(model.named_parameters(), got, strict=True):
        torch.testing.assert_close(g, want[n], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(loss, clean, rtol=1e-14, atol=0)  # the whole clean loss, ℓ + aux


@pytest.mark.parametrize("name", ["fsam", "pfsam"])
def test_a_functional_loss_fn_with_a_term_that_bypasses_the_logits_is_refused(name):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.4, lr=0.1)
    before = params_of(model)

    def loss_fn(logits):  # the L2 term would be dropped silently by J(θ+ε)ᵀ r(θ)
        return F.cross_entropy(logits, y) + LAMBDA * (model.fc1.weight**2).sum()

    with pytest.raises(ValueError, match=r"forward=lambda: \(logits, aux_loss\)"):
        opt.step(forward=lambda: model(x), loss_fn=loss_fn)
    assert_bitwise_equal(params_of(model), before)
    # the same term as an aux loss is accepted
    opt.step(
        forward=lambda: (model(x), LAMBDA * (model.fc1.weight**2).sum()),
        loss_fn=ce(y),
    )


def test_an_aux_loss_that_goes_through_the_logits_is_refused():
    x, y = make_batch()
    model = make_mlp()
    opt = create("fsam", model.parameters(), rho=0.4, lr=0.1)

    def forward():
        logits = model(x)
        return logits, 1e-3 * torch.logsumexp(logits, -1).pow(2).mean()  # a z-loss

    with pytest.raises(ValueError, match="depends on the logits"):
        opt.step(forward=forward, loss_fn=ce(y))


@pytest.mark.parametrize("name", ["sam", "fsam"])
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (lambda out: (out, out, out), TypeError, "forward\\(\\) must return the logits"),
        (lambda out: [out.sum(), out], TypeError, "forward\\(\\) must return the logits"),
        (lambda out: {"logits": out}, TypeError, "returned a dict: loss_fn receives it whole"),
        (lambda out: (out, torch.ones(3, requires_grad=True)), TypeError, "aux_loss a scalar"),
    ],
)
def test_forward_returning_something_else_is_a_clear_error(name, bad, error, match):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.4, lr=0.1)
    before = params_of(model)
    with pytest.raises(error, match=match):
        opt.step(forward=lambda: bad(model(x)), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)


@pytest.mark.parametrize("name", ["sam", "fsam", "gasam"])
@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (lambda logits: 1.5, TypeError, "got a float"),
        (lambda logits: logits.sum(-1), ValueError, "got shape \\(16,\\)"),
        (lambda logits: logits.detach().sum(), ValueError, "does not require grad"),
    ],
)
def test_a_loss_fn_that_is_not_a_scalar_tensor_is_a_clear_error(name, loss_fn, error, match):
    x, _ = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.4, lr=0.1)
    before = params_of(model)
    with pytest.raises(error, match=match):
        opt.step(forward=lambda: model(x), loss_fn=loss_fn)
    assert_bitwise_equal(params_of(model), before)
