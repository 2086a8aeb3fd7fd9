"""perturb_every=k: a fresh ε every k-th step, the stored direction reused (one pass) in between."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vjp

from flatlm.optim import NonFiniteStepWarning, create
from helpers.optim import (
    COMBINING_METHODS,
    GRADIENT_METHODS,
    SpyAdamW,
    SpySGD,
    assert_bitwise_equal,
    ce,
    make_batch,
    make_mlp,
    params_of,
)

# The momentum methods refuse perturb_every (test_momentum.py), and so do WSAM and GSAM, which
# need a clean and a perturbed gradient every fresh step (test_family.py).
SAM_METHODS = [m for m in GRADIENT_METHODS if m not in COMBINING_METHODS]
FUNCTIONAL = {"fsam", "pfsam"}
PRECONDITIONED = {"psam", "pfsam"}


def _loss_at(model, x, y):
    def loss(params):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


def _expected_grad(model, theta, delta, rho, x, y, functional):
    """The gradient a step at θ with ε = ρδ should hand to the base optimizer (torch.func)."""
    shifted = {n: theta[n] + rho * delta[n] for n in theta}
    if not functional:
        return grad(_loss_at(model, x, y))(shifted)

    def logits_of(params):
        return functional_call(model, params, (x,))

    r = grad(lambda z: F.cross_entropy(z, y))(logits_of(theta))
    _, pullback = vjp(logits_of, shifted)
    return pullback(r)[0]


def _clean_grads_into(model, x, y):
    model.zero_grad(set_to_none=True)
    ce(y)(model(x)).backward()


@pytest.mark.parametrize("name", SAM_METHODS)
def test_steps_in_between_take_the_gradient_at_the_stored_direction_times_the_current_rho(name):
    k, steps = 3, 7
    base = SpyAdamW if name in PRECONDITIONED else SpySGD
    model, ref_model = make_mlp(), make_mlp()
    opt = create(name, model.parameters(), base_optimizer=base, rho=0.2, lr=0.05, perturb_every=k)
    names = [n for n, _ in model.named_parameters()]
    delta = None
    for t in range(steps):
        x, y = make_batch(seed=10 + t)  # new data every step: the direction really is stale
        rho = 0.2 * (1 + t / 5)  # a ρ schedule: reused steps use today's ρ, not the stored one
        for g in opt.param_groups:
            g["rho"] = rho
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        if t % k == 0:  # fresh: δ = ε/ρ from the clean gradient of this batch
            _clean_grads_into(model, x, y)
            if name in ("sam", "fsam"):  # the closed form, independent of flatlm
                g = {n: p.grad.clone() for n, p in model.named_parameters()}
                norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
                delta = {n: g[n] / norm for n in names}
            else:  # the method's own direction rule (checked against closed forms elsewhere)
                eps = opt.perturbation()
                delta = {n: e / rho for n, e in zip(names, eps, strict=True)}
            model.zero_grad(set_to_none=True)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        seen = opt.base_optimizer.seen_params[t]
        assert_bitwise_equal(seen, list(theta.values()))  # the base steps from the clean θ
        ref_model.load_state_dict(theta)
        expected = _expected_grad(ref_model, theta, delta, rho, x, y, name in FUNCTIONAL)
        for n, got in zip(names, opt.base_optimizer.seen_grads[t], strict=True):
            torch.testing.assert_close(got, expected[n], rtol=1e-11, atol=1e-13)


def _counting_forward(model, x, log, nan_on_call=None):
    """forward() that logs whether each call records a graph (a backward follows), and whose
    logits are NaN on call number ``nan_on_call`` of this log."""

    def forward():
        out = model(x)
        if len(log) == nan_on_call:
            out = out * float("nan")
        log.append(torch.is_grad_enabled())
        return out

    return forward


@pytest.mark.parametrize("name", SAM_METHODS)
def test_a_step_in_between_costs_one_forward_backward(name):
    model = make_mlp()
    x, y = make_batch()
    opt = create(name, model.parameters(), rho=0.1, lr=0.01, perturb_every=3)
    per_step = []
    for _ in range(6):
        log: list[bool] = []
        opt.step(forward=_counting_forward(model, x, log), loss_fn=ce(y))
        per_step.append(log)
    fresh = [True, True]  # clean forward–backward, perturbed forward–backward
    between = [False, True] if name in FUNCTIONAL else [True]  # r(θ) from a no-grad forward
    assert per_step == [fresh, between, between, fresh, between, between]


def test_the_returned_loss_is_clean_where_a_clean_forward_runs_and_perturbed_otherwise():
    x, y = make_batch()
    for name, clean in [("sam", False), ("fsam", True)]:
        model, twin = make_mlp(), make_mlp()
        opt = create(name, model.parameters(), rho=0.5, lr=0.01, perturb_every=2)
        opt.step(forward=lambda model=model: model(x), loss_fn=ce(y))
        twin.load_state_dict(model.state_dict())
        delta = [d.clone() for d in (opt.state[p]["perturb_direction"] for p in model.parameters())]
        loss = opt.step(forward=lambda model=model: model(x), loss_fn=ce(y))
        with torch.no_grad():
            if not clean:
                for p, d in zip(twin.parameters(), delta, strict=True):
                    p.add_(0.5 * d)
            expected = ce(y)(twin(x))
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", SAM_METHODS)
def test_resuming_between_fresh_perturbations_is_bit_for_bit(name):
    batches = [make_batch(seed=s) for s in range(5)]
    straight = make_mlp()
    opt = create(name, straight.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    for x, y in batches:
        opt.step(forward=lambda x=x: straight(x), loss_fn=ce(y))

    first = make_mlp()
    opt1 = create(name, first.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    for x, y in batches[:2]:  # stop after one step that reused the direction
        opt1.step(forward=lambda x=x: first(x), loss_fn=ce(y))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = make_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = create(name, resumed.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in batches[2:]:
        opt2.step(forward=lambda x=x: resumed(x), loss_fn=ce(y))
    assert_bitwise_equal(params_of(resumed), params_of(straight))


@pytest.mark.parametrize("name", SAM_METHODS)
def test_a_skipped_fresh_step_leaves_nothing_to_reuse_so_the_next_step_is_fresh(name):
    model = make_mlp()
    x, y = make_batch()
    opt = create(name, model.parameters(), rho=0.1, lr=0.01, perturb_every=4)
    before = params_of(model)
    log: list[bool] = []
    with pytest.warns(NonFiniteStepWarning):
        opt.step(forward=_counting_forward(model, x, log, nan_on_call=0), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    log = []
    opt.step(forward=_counting_forward(model, x, log), loss_fn=ce(y))
    assert log == [True, True]  # fresh again
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", SAM_METHODS)
def test_a_non_finite_step_in_between_is_skipped_bit_for_bit(name):
    model = make_mlp()
    x, y = make_batch()
    opt = create(name, model.parameters(), rho=0.1, lr=0.01, perturb_every=3)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    before = params_of(model)
    state_before = {
        k: v.clone() for p in model.parameters() for k, v in opt.base_optimizer.state[p].items()
    }
    log: list[bool] = []
    last = 1 if name in FUNCTIONAL else 0  # poison the perturbed pass
    with pytest.warns(NonFiniteStepWarning):
        opt.step(forward=_counting_forward(model, x, log, nan_on_call=last), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    state_after = {k: v for p in model.parameters() for k, v in opt.base_optimizer.state[p].items()}
    for k, v in state_before.items():
        assert torch.equal(v, state_after[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(forward=lambda: model(x), loss_fn=ce(y))  # and training goes on
    assert opt.skipped_steps == 1


def test_perturb_every_one_never_stores_a_direction():
    model = make_mlp()
    x, y = make_batch()
    opt = create("sam", model.parameters(), rho=0.1, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert all("perturb_direction" not in opt.state.get(p, {}) for p in model.parameters())


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_perturb_every_is_rejected(bad):
    with pytest.raises(ValueError, match="perturb_every must be an integer >= 1"):
        create("sam", make_mlp().parameters(), perturb_every=bad)


def test_the_protocols_that_run_their_own_clean_pass_refuse_perturb_every():
    model = make_mlp()
    x, y = make_batch()
    opt = create("sam", model.parameters(), rho=0.1, lr=0.01, perturb_every=2)
    ce(y)(model(x)).backward()
    with pytest.raises(RuntimeError, match=r"perturb_every > 1 .* step\(forward="):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturb_every > 1"):
        opt.step(lambda: ce(y)(model(x)))
    with pytest.raises(ValueError, match="plain AdamW takes no sharpness-aware options"):
        create("adamw", model.parameters(), perturb_every=2)


def test_with_a_fused_base_a_skipped_fresh_step_skips_until_the_next_fresh_one():
    # The fused skip happens on the device, so the host cannot know the fresh step failed: the
    # stored direction is then non-finite and the steps that reuse it are skipped as well, with θ
    # intact, until the next fresh step.
    x, y = make_batch(dtype=torch.float32)
    model = make_mlp(dtype=torch.float32)
    opt = create("sam", model.parameters(), rho=0.1, lr=0.01, fused=True, perturb_every=3)
    assert opt.skips_on_device
    before = params_of(model)
    log: list[bool] = []
    opt.step(
        forward=_counting_forward(model, x, log, nan_on_call=0), loss_fn=ce(y)
    )  # clean pass NaN
    for _ in range(2):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    assert opt.skipped_steps == 3
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # fresh again: taken
    assert opt.skipped_steps == 3
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))


def test_a_grad_scaler_resumed_between_fresh_perturbations_continues_bit_for_bit():
    # A just-loaded GradScaler has no scale tensor until it scales a loss; a reused step of a
    # non-functional method must not need one before its single pass.
    batches = [make_batch(seed=s, dtype=torch.float32) for s in range(4)]
    straight = make_mlp(dtype=torch.float32)
    opt = create("sam", straight.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches:
        opt.step(forward=lambda x=x: straight(x), loss_fn=ce(y), grad_scaler=scaler)

    first = make_mlp(dtype=torch.float32)
    opt1 = create("sam", first.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    scaler1 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batches[0]
    opt1.step(forward=lambda: first(x), loss_fn=ce(y), grad_scaler=scaler1)
    resumed = make_mlp(dtype=torch.float32)
    resumed.load_state_dict(first.state_dict())
    opt2 = create("sam", resumed.parameters(), rho=0.2, lr=0.01, perturb_every=3)
    opt2.load_state_dict(opt1.state_dict())
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(scaler1.state_dict())
    for x, y in batches[1:]:
        opt2.step(forward=lambda x=x: resumed(x), loss_fn=ce(y), grad_scaler=scaler2)
    assert_bitwise_equal(params_of(resumed), params_of(straight))


@pytest.mark.parametrize("name", ["sam", "fsam"])
def test_reused_steps_over_micro_batches_give_each_its_own_dropout_mask(name):
    # ρ = 0: every step must equal AdamW with accumulation over the same micro-batches, which
    # holds only if each micro-batch's forward sees its own randomness, as AdamW's would.
    x, y = make_batch(n=16)
    micro = list(zip(x.split(8), y.split(8), strict=True))

    ref = make_mlp(dropout=0.5)
    torch.manual_seed(11)
    base = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for _ in range(3):
        base.zero_grad()
        for xb, yb in micro:
            (ce(yb)(ref(xb)) / len(micro)).backward()
        base.step()
    rng_after = torch.get_rng_state()

    model = make_mlp(dropout=0.5)
    torch.manual_seed(11)
    opt = create(name, model.parameters(), rho=0.0, lr=0.01, perturb_every=2)
    for _ in range(3):
        opt.step(
            forward=lambda mb: model(mb[0]),
            loss_fn=lambda z, mb: ce(mb[1])(z),
            micro_batches=micro,
        )
    assert_bitwise_equal(params_of(model), params_of(ref))
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_a_parameter_without_gradient_at_a_fresh_step_is_not_perturbed_by_the_reused_steps():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4).double(), torch.nn.Linear(5, 4).double()
    x, y = make_batch()
    opt = create("sam", [*a.parameters(), *b.parameters()], rho=0.1, lr=0.01, perturb_every=2)
    seen: list[torch.Tensor] = []

    def forward(use_b):
        def f():
            seen.append(b.weight.detach().clone())
            return a(x) + (b(x) if use_b else 0)

        return f

    opt.step(forward=forward(True), loss_fn=ce(y))  # fresh: a and b
    opt.step(forward=forward(True), loss_fn=ce(y))  # reused
    opt.step(forward=forward(False), loss_fn=ce(y))  # fresh: only a has a gradient
    stored = [opt.state[p]["perturb_direction"] for p in a.parameters()]
    assert all("perturb_direction" not in opt.state[p] for p in b.parameters())
    torch.testing.assert_close(sum(d.pow(2).sum() for d in stored), torch.tensor(1.0).double())
    seen.clear()
    theta_b = b.weight.detach().clone()
    opt.step(forward=forward(False), loss_fn=ce(y))  # reused: b stays where it is
    assert torch.equal(seen[0], theta_b)


def test_a_checkpoint_passed_through_perturb_every_one_carries_no_stale_direction():
    x, y = make_batch()
    model = make_mlp()
    opt3 = create("sam", model.parameters(), rho=0.1, lr=0.01, perturb_every=3)
    opt3.step(forward=lambda: model(x), loss_fn=ce(y))
    opt1 = create("sam", model.parameters(), rho=0.1, lr=0.01)
    opt1.load_state_dict(opt3.state_dict())
    assert all("perturb_direction" not in opt1.state.get(p, {}) for p in model.parameters())
    for _ in range(2):
        opt1.step(forward=lambda: model(x), loss_fn=ce(y))
    saved = opt1.state_dict()
    assert all(g["flatlm_steps_since_fresh_perturbation"] is None for g in saved["param_groups"])
    again = create("sam", model.parameters(), rho=0.1, lr=0.01, perturb_every=3)
    again.load_state_dict(saved)
    log: list[bool] = []
    again.step(forward=_counting_forward(model, x, log), loss_fn=ce(y))
    assert log == [True, True]  # fresh, not a reuse of the direction from before the k=1 phase
