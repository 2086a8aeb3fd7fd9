"""Guarantees every method shares: exact restore, skipping, checkpoints, errors, RNG replay."""

from __future__ import annotations

import io
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from flatlm.optim import (
    GASAM,
    SAM,
    FunctionalSAM,
    NonFiniteStepWarning,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
    create,
)
from helpers.optim import (
    POISON_CASES,
    SAM_METHODS,
    SpySGD,
    assert_bitwise_equal,
    ce,
    forward_calls,
    make_batch,
    make_mlp,
    params_of,
    poisoned_forward,
    spy_base,
    state_tensors,
)


@pytest.mark.parametrize("name", SAM_METHODS)
def test_base_optimizer_steps_from_the_exact_clean_parameters(name):
    x, y = make_batch()
    model = make_mlp(dtype=torch.float32)
    opt = create(name, model.parameters(), base_optimizer=spy_base(name), rho=5.0, lr=0.1)
    for _ in range(3):
        before = params_of(model)
        opt.step(forward=lambda: model(x.float()), loss_fn=ce(y))
        assert_bitwise_equal(opt.base_optimizer.seen_params[-1], before)


@settings(max_examples=25, deadline=None)
@given(
    rho=st.floats(min_value=1e-6, max_value=1e4),
    scale=st.floats(min_value=1e-6, max_value=1e3),
    seed=st.integers(0, 2**16),
)
def test_restore_is_bitwise_for_any_radius_and_scale(rho, scale, seed):
    # add-then-subtract would drift here (ρ ≫ |θ|); the engine copies θ back instead.
    torch.manual_seed(seed)
    theta = nn.Parameter(torch.randn(37) * scale)
    w = torch.randn(37)
    opt = SAM([theta], SpySGD, rho=rho, lr=0.0)
    before = theta.detach().clone()
    opt.step(forward=lambda: torch.sin(theta * w), loss_fn=lambda f: (f**2).sum())
    assert torch.equal(opt.base_optimizer.seen_params[0][0], before)
    assert torch.equal(theta.detach(), before)  # lr = 0


@pytest.mark.parametrize(("name", "bad_call"), POISON_CASES)
def test_a_non_finite_pass_skips_the_step_and_changes_nothing(name, bad_call):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.1, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # base state exists now
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    params, state = params_of(model), state_tensors(opt)

    with pytest.warns(NonFiniteStepWarning, match="skipped"):
        opt.step(forward=poisoned_forward(model, x, bad_call), loss_fn=ce(y))

    assert_bitwise_equal(params_of(model), params)
    assert_bitwise_equal(state_tensors(opt), state)
    assert opt.skipped_steps == 1
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 1


def test_fused_adamw_skips_on_device_without_a_host_read():
    x, y = make_batch(dtype=torch.float32)
    model = make_mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01, fused=True)
    assert opt.skips_on_device
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    params, state = params_of(model), state_tensors(opt)
    opt.step(forward=poisoned_forward(model, x, 1), loss_fn=ce(y))  # no warning: no host read
    assert_bitwise_equal(params_of(model), params)
    assert_bitwise_equal(state_tensors(opt), state)
    assert opt.skipped_steps == 1
    # a good step afterwards equals the unfused optimizer's second step
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    ref = make_mlp(dtype=torch.float32)
    ref_opt = SAM(ref.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01)
    for _ in range(2):
        ref_opt.step(forward=lambda: ref(x), loss_fn=ce(y))
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SAM_METHODS)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    batches = [make_batch(seed=s) for s in range(6)]

    def train(model, opt, sched, steps):
        for xb, yb in steps:
            opt.step(forward=lambda xb=xb: model(xb), loss_fn=ce(yb))
            sched.step()

    def build():
        model = make_mlp(dropout=0.1)
        opt = create(name, model.parameters(), rho=0.1, lr=0.01, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    torch.manual_seed(5)
    model, opt, sched = build()
    train(model, opt, sched, batches)
    straight = params_of(model)

    torch.manual_seed(5)
    model, opt, sched = build()
    train(model, opt, sched, batches[:3])
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, opt, sched = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    torch.set_rng_state(ckpt["rng"])
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert len(opt.base_optimizer.state) == len(list(model.parameters()))
    train(model, opt, sched, batches[3:])
    assert_bitwise_equal(params_of(model), straight)


def test_load_state_dict_rejects_foreign_or_corrupt_state():
    model = make_mlp()
    opt = SAM(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=r"no 'flatlm_method'.*opt\.base_optimizer"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    with pytest.raises(ValueError, match="keys 'state' and 'param_groups'"):
        opt.load_state_dict({"exp_avg": {}})
    with pytest.raises(ValueError, match="FunctionalSAM"):
        opt.load_state_dict(FunctionalSAM(model.parameters(), lr=0.01).state_dict())
    with pytest.raises(ValueError, match="state dict"):
        opt.load_state_dict("garbage")  # type: ignore[arg-type]


def test_lr_scheduler_drives_the_base_optimizer_through_the_shared_groups():
    model = make_mlp()
    opt = PreconditionedFunctionalSAM(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch()
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -0.1}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"rho": float("inf")}, ValueError, "rho"),
        ({"rho": "0.05"}, ValueError, "rho"),
        ({"base_optimizer": nn.Linear}, TypeError, "torch.optim.Optimizer subclass"),
        ({"base_optimizer": "adamw"}, TypeError, "torch.optim.Optimizer subclass"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"eta": -1.0, "adaptive": True}, ValueError, "eta"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs, error, match):
    model = make_mlp()
    with pytest.raises(error, match=match):
        SAM(model.parameters(), **{"lr": 0.01, **kwargs})


def test_more_bad_arguments():
    model = make_mlp()
    with pytest.raises(ValueError, match="params differ from the wrapped optimizer's"):
        SAM(model.parameters(), torch.optim.AdamW(make_mlp().parameters()))
    with pytest.raises(ValueError, match="empty parameter list"):
        SAM([], lr=0.01)
    with pytest.raises(TypeError, match="second moment"):
        PreconditionedSAM(model.parameters(), torch.optim.SGD, lr=0.01)
    with pytest.raises(ValueError, match="beta"):
        GASAM(model.parameters(), beta=1.0, lr=0.01)
    with pytest.raises(ValueError, match="ascent_steps"):
        GASAM(model.parameters(), ascent_steps=0, lr=0.01)
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        create("adam", model.parameters())
    with pytest.raises(ValueError, match="no sharpness-aware options"):
        create("adamw", model.parameters(), rho=0.1)
    opt = SAM(model.parameters(), lr=0.01)
    opt.param_groups[0]["rho"] = -1.0
    x, y = make_batch()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: rho"):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    with pytest.raises(RuntimeError, match="without first_step"):
        SAM(model.parameters(), lr=0.01).second_step()
    with pytest.raises(TypeError, match="loss_fn"):
        SAM(model.parameters(), lr=0.01).step(forward=lambda: model(x))


@pytest.mark.parametrize("name", SAM_METHODS)
def test_parameters_without_gradient_are_left_alone(name):
    x, y = make_batch()
    model = make_mlp()
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64))
    before = unused.detach().clone()
    opt = create(name, [*model.parameters(), unused], rho=0.1, lr=0.01, weight_decay=0.1)
    for _ in range(2):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert unused.grad is None
    assert torch.equal(unused.detach(), before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", SAM_METHODS)
def test_an_all_zero_gradient_gives_no_perturbation_and_no_nan(name):
    x, _ = make_batch()
    model = make_mlp()
    opt = create(
        name, model.parameters(), base_optimizer=spy_base(name), rho=0.5, lr=0.1, weight_decay=0
    )
    before = params_of(model)
    opt.step(forward=lambda: model(x), loss_fn=lambda logits: 0.0 * logits.sum())
    assert all(torch.equal(e, torch.zeros_like(e)) for e in opt.perturbation())
    assert all(torch.equal(g, torch.zeros_like(g)) for g in opt.base_optimizer.seen_grads[0])
    assert_bitwise_equal(params_of(model), before)  # AdamW without decay, zero gradient


def _with_idle_group(model):
    idle = torch.nn.Parameter(torch.zeros(1))
    return [{"params": list(model.parameters())}, {"params": [idle], "rho": 0.5}]


@pytest.mark.parametrize("perturb_every", [1, 2])
@pytest.mark.parametrize("cls", [SAM, FunctionalSAM])
def test_both_passes_see_the_same_dropout_mask(cls, perturb_every):
    # With ρ = 0 the perturbed point is θ, so the second pass reproduces the clean gradient
    # exactly if, and only if, it sees the same dropout mask (with perturb_every=2 the second step
    # reuses the direction: Functional-SAM's no-grad clean forward must see that mask too).
    # ρ = 0 in *every* group would make the step plain (one pass): a group of one parameter
    # that never has a gradient keeps ρ > 0, so both passes run, at ε = 0.
    x, y = make_batch()
    ref = make_mlp(dropout=0.5)
    torch.manual_seed(11)
    base = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for _ in range(3):
        base.zero_grad()
        ce(y)(ref(x)).backward()
        base.step()
    rng_after = torch.get_rng_state()

    model = make_mlp(dropout=0.5)
    torch.manual_seed(11)
    opt = cls(_with_idle_group(model), rho=0.0, lr=0.01, perturb_every=perturb_every)
    for _ in range(3):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), params_of(ref))
    assert torch.equal(torch.get_rng_state(), rng_after)  # same randomness used as AdamW

    model = make_mlp(dropout=0.5)
    torch.manual_seed(11)
    opt = cls(
        _with_idle_group(model), rho=0.0, lr=0.01, replay_rng=False, perturb_every=perturb_every
    )
    for _ in range(3):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters(), strict=True)
    )


def test_step_returns_the_clean_loss_as_a_tensor():
    x, y = make_batch()
    model = make_mlp()
    expected = ce(y)(model(x)).detach()
    loss = SAM(model.parameters(), rho=0.1, lr=0.01).step(forward=lambda: model(x), loss_fn=ce(y))
    assert torch.is_tensor(loss) and not loss.requires_grad
    assert math.isclose(loss.item(), expected.item(), rel_tol=0, abs_tol=0)


def test_method_specs_name_variants():
    from flatlm.optim import parse_method

    assert parse_method("gasam:alpha=-1,ascent_steps=2") == (
        "gasam",
        {"alpha": -1, "ascent_steps": 2},
    )
    assert parse_method("SAM:adaptive=true, eta=0.1") == ("sam", {"adaptive": True, "eta": 0.1})
    model = make_mlp()
    opt = create("gasam:alpha=0.5,ascent_steps=3", model.parameters(), lr=0.01, rho=0.2)
    assert opt.direction.alpha == 0.5 and opt.ascent_steps == 3 and opt.defaults["rho"] == 0.2
    with pytest.raises(ValueError, match="key=value"):
        parse_method("gasam:alpha")
    with pytest.raises(ValueError, match="fsam has no option 'alpha'"):
        create("fsam:alpha=1", model.parameters(), lr=0.01)
    with pytest.raises(TypeError, match=r"unknown keyword argument.*fsam.s own options"):
        create("fsam", model.parameters(), lr=0.01, alpha=1)


@pytest.mark.parametrize("name", SAM_METHODS)
def test_an_error_in_the_perturbed_pass_leaves_theta_exactly_clean(name):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.5, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    before, state = params_of(model), state_tensors(opt)
    calls = {"n": 0}

    def forward():  # the perturbed pass is the last one of the step
        calls["n"] += 1
        if calls["n"] == forward_calls(name):
            raise MemoryError("out of memory in the perturbed pass")
        return model(x)

    with pytest.raises(MemoryError):
        opt.step(forward=forward, loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    assert_bitwise_equal(state_tensors(opt), state)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # and the next step is normal


def test_abort_step_undoes_a_first_step():
    x, y = make_batch()
    model = make_mlp()
    opt = SAM(model.parameters(), rho=0.5, lr=0.01)
    before = params_of(model)
    ce(y)(model(x)).backward()
    opt.first_step()
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))
    opt.abort_step()
    assert_bitwise_equal(params_of(model), before)
    opt.abort_step()  # a no-op now
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


@pytest.mark.parametrize("name", ["sam", "psam", "gasam"])
def test_a_non_finite_perturbed_loss_with_finite_gradients_still_skips(name):
    # A term with no gradient (a constant inf) leaves every gradient finite: only the loss
    # itself says the perturbed point is bad.
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.5, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    before, state = params_of(model), state_tensors(opt)
    calls = {"n": 0}

    def loss_fn(logits):
        calls["n"] += 1
        loss = ce(y)(logits)
        return loss + float("inf") if calls["n"] == 2 else loss  # the perturbed pass

    with pytest.warns(NonFiniteStepWarning):
        opt.step(forward=lambda: model(x), loss_fn=loss_fn)
    assert_bitwise_equal(params_of(model), before)
    assert_bitwise_equal(state_tensors(opt), state)


@pytest.mark.parametrize(("name", "ascent_steps"), [("sam", 1), ("psam", 1), ("gasam", 3)])
def test_the_perturbation_norm_is_recorded_only_when_asked(name, ascent_steps):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.3, lr=0.01, ascent_steps=ascent_steps)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert opt.perturbation_norm is None  # off by default: no extra norm per step
    opt.record_perturbation_norm = True
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    # one ascent step: ‖ε‖ = ρ exactly (Euclidean radius); K steps: at most ρ
    norm = float(opt.perturbation_norm)
    assert norm == pytest.approx(0.3, rel=1e-12) if ascent_steps == 1 else 0 < norm <= 0.3 + 1e-12
