"""ρ schedules (flatlm.optim.schedules): closed forms, resume, composition with LR schedulers."""

from __future__ import annotations

import io
import math

import pytest
import torch

from flatlm.optim import create
from flatlm.optim.schedules import (
    RhoCosine,
    RhoLambda,
    RhoLinear,
    RhoWindow,
    build_rho_schedule,
    cosine_factor,
    fraction_to_step,
    linear_factor,
    parse_rho_schedule,
    window_factor,
)
from helpers.optim import assert_bitwise_equal, ce, make_batch, make_mlp, params_of


def _sam(rho: float = 0.5, lr: float = 0.05, model=None):
    model = model or make_mlp()
    return model, create("sam", model.parameters(), rho=rho, lr=lr)


def _rhos(sched, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.optimizer.param_groups[0]["rho"])
        sched.step()
    return out


def test_fractions_are_read_as_the_decimals_written():
    # binary floats would put step 7 inside a 7 % window of 100 steps, and step 28 outside 29 %
    assert math.ceil(0.07 * 100) == 8 and math.ceil(0.29 * 100) == 29
    assert fraction_to_step(0.07, 100) == 7 and fraction_to_step(0.29, 100) == 29
    assert fraction_to_step(0.1, 600) == 60
    assert fraction_to_step(0.25, 600) == 150
    assert fraction_to_step(1 / 3, 600) == 200
    assert fraction_to_step(0.0, 7) == 0 and fraction_to_step(1.0, 7) == 7
    assert fraction_to_step(0.5, 7) == 4  # the first step k with k >= 3.5


def test_window_closed_form_in_fractions_and_in_steps():
    _, opt = _sam(rho=2.0)
    sched = RhoWindow(opt, 0.0, 0.1, total_steps=600)
    assert _rhos(sched, 600) == [2.0] * 60 + [0.0] * 540
    _, opt = _sam(rho=2.0)
    late = RhoWindow(opt, 0.75, 1.0, total_steps=600)
    assert _rhos(late, 600) == [0.0] * 450 + [2.0] * 150
    _, opt = _sam(rho=2.0)
    steps = RhoWindow(opt, 3, 5)
    assert _rhos(steps, 8) == [0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    assert [window_factor(k, 3, 5) for k in range(6)] == [0, 0, 0, 1, 1, 0]


def test_linear_and_cosine_ramps_against_closed_forms():
    total, rho = 40, 0.3
    start, end = fraction_to_step(0.25, total), fraction_to_step(0.75, total)  # 10, 30
    for cls, shape in (
        (RhoLinear, lambda t: t),
        (RhoCosine, lambda t: (1 - math.cos(math.pi * t)) / 2),
    ):
        _, opt = _sam(rho=rho)
        warm = cls(opt, 0.25, 0.75, total_steps=total)
        got = _rhos(warm, total)
        want = [rho * shape(min(max((k - start) / (end - start), 0.0), 1.0)) for k in range(total)]
        assert got == pytest.approx(want, abs=1e-15, rel=1e-15)
        _, opt = _sam(rho=rho)
        decay = cls(opt, 2, 6, begin=1.0, final=0.25)
        want = [rho * (1 - 0.75 * shape(min(max((k - 2) / 4, 0.0), 1.0))) for k in range(9)]
        assert _rhos(decay, 9) == pytest.approx(want, abs=1e-15, rel=1e-15)
    assert linear_factor(5, 0, 10) == 0.5 and cosine_factor(5, 0, 10) == pytest.approx(0.5)
    assert cosine_factor(0, 0, 10, 1, 0) == 1 and cosine_factor(10, 0, 10, 1, 0) == 0


def test_lambda_multiplies_every_groups_initial_rho():
    model = make_mlp()
    groups = [
        {"params": [model.fc1.weight], "rho": 0.2},
        {"params": [p for n, p in model.named_parameters() if n != "fc1.weight"]},
    ]
    opt = create("sam", groups, rho=0.5, lr=0.1)
    sched = RhoLambda(opt, lambda k: window_factor(k, 0, 4) * linear_factor(k, 0, 4, 1.0, 0.0))
    for k in range(6):
        f = max(0.0, 1 - k / 4) if k < 4 else 0.0
        assert [g["rho"] for g in opt.param_groups] == pytest.approx([0.2 * f, 0.5 * f])
        assert [g["initial_rho"] for g in opt.param_groups] == [0.2, 0.5]
        sched.step()
    assert "fn" not in sched.state_dict()


def _train(opt, model, steps, scheds):
    x, y = make_batch()
    for _ in range(steps):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
        for s in scheds:
            s.step()


def test_state_dict_round_trip_mid_window_is_bit_exact():
    total, cut = 12, 5  # the window is steps 3..8: the cut falls inside it
    model, opt = _sam()
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    sched = RhoWindow(opt, 0.25, 0.75, total_steps=total)
    _train(opt, model, cut, [lr_sched, sched])
    assert opt.param_groups[0]["rho"] == 0.5
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "lr": lr_sched.state_dict(),
            "rho": sched.state_dict(),
        },
        buffer,
    )
    _train(opt, model, total - cut, [lr_sched, sched])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, opt2 = _sam(model=make_mlp(seed=3))  # other weights: all must come from the save
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    lr2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=total)
    rho2 = RhoWindow(opt2, 0.0, 1.0, total_steps=99)  # other bounds: the state's must win
    lr2.load_state_dict(saved["lr"])
    rho2.load_state_dict(saved["rho"])
    assert (rho2.last_step, rho2.start_step, rho2.end_step) == (cut, 3, 9)
    assert opt2.param_groups[0]["rho"] == 0.5
    _train(opt2, model2, total - cut, [lr2, rho2])
    assert_bitwise_equal(params_of(model), params_of(model2))
    assert [g["rho"] for g in opt2.param_groups] == [g["rho"] for g in opt.param_groups] == [0.0]


def test_composes_with_torch_lr_schedulers_each_on_its_own_key():
    total, lr = 10, 0.05
    model, opt = _sam(lr=lr)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    rho_sched = RhoCosine(opt, 0.0, 0.5, total_steps=total, begin=1.0, final=0.0)
    x, y = make_batch()
    for k in range(1, total + 1):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
        lr_sched.step()
        warm.step()
        rho_sched.step()
        cosine = (1 + math.cos(math.pi * k / total)) / 2
        linear = 0.5 + 0.5 * min(k, 4) / 4
        rho_want = 0.5 * (1 + math.cos(math.pi * min(k / 5, 1.0))) / 2
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr * cosine * linear, rel=1e-12, abs=1e-15)
            assert g["rho"] == pytest.approx(0.5 * rho_want / 0.5, rel=1e-12, abs=1e-15)
            assert (g["initial_lr"], g["initial_rho"]) == (lr, 0.5)


def test_parse_and_build_from_strings():
    assert parse_rho_schedule("window:0:0.1") == parse_rho_schedule(" window : 0 : 0.1 ")
    s = parse_rho_schedule("cosine:0.5:1:1:0")
    assert (s.name, s.start, s.end, s.begin, s.final, s.in_steps) == ("cosine", 0.5, 1, 1, 0, False)
    s = parse_rho_schedule("linear:0s:60s")
    assert (s.start, s.end, s.in_steps) == (0, 60, True)
    _, opt = _sam(rho=2.0)
    assert build_rho_schedule(opt, "constant", 100) is None
    sched = build_rho_schedule(opt, "window:0:0.1", 600)
    assert isinstance(sched, RhoWindow) and (sched.start_step, sched.end_step) == (0, 60)
    _, opt = _sam(rho=2.0)
    sched = build_rho_schedule(opt, "linear:10s:20s:1:0.5", 600)
    assert isinstance(sched, RhoLinear) and (sched.start_step, sched.end_step) == (10, 20)
    assert (sched.begin, sched.final) == (1.0, 0.5)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("windw:0:0.1", "unknown ρ schedule 'windw'"),
        ("window:0.5:0.5", "start 0.5 must be before end 0.5"),
        ("window:0.6:0.2", "must be before end"),
        ("window:0:1.5", "must be in \\[0, 1\\]"),
        ("window:-0.1:0.5", "must be in \\[0, 1\\]"),
        ("window:0:10s", "mixes a fraction and a step"),
        ("window:0", "has 1 fields"),
        ("window:0:0.1:1:0", "has 4 fields"),
        ("linear:0:0.5:1", "has 3 fields"),
        ("cosine:0:0.5:1:-1", "finite factors >= 0"),
        ("window:a:0.5", "bad bound 'a'"),
        ("constant:0:1", "takes no bounds"),
    ],
)
def test_bad_strings_are_refused_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rho_schedule(spec)


def test_bad_arguments_are_refused_naming_the_problem():
    _, opt = _sam()
    with pytest.raises(ValueError, match="must be before end"):
        RhoWindow(opt, 0.5, 0.2, total_steps=10)
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        RhoWindow(opt, 0.0, 1.2, total_steps=10)
    with pytest.raises(ValueError, match="must be a step number"):
        RhoWindow(opt, 0.0, 0.5)  # fractions without total_steps
    with pytest.raises(ValueError, match="total_steps must be"):
        RhoWindow(opt, 0.0, 0.5, total_steps=0)
    with pytest.raises(ValueError, match="begin=-1"):
        RhoLinear(opt, 0, 4, begin=-1.0)
    adamw = torch.optim.AdamW(make_mlp().parameters())
    with pytest.raises(ValueError, match=r"has no .rho.*sharpness-aware"):
        RhoWindow(adamw, 0, 4)
    with pytest.raises(KeyError, match="initial_rho"):
        RhoWindow(_sam()[1], 0, 4, last_step=3)
