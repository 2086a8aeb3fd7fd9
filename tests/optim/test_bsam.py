"""bSAM against a float64 reference written from the paper (Möllenhoff & Khan, ICLR 2023,
Algorithm 1) and against pytorch_optimizer 4.1's BSAM run as published.

The reference is a plain loop over named tensors with torch.func (none of flatlm's code); it
draws the paper's noise e ~ N(0, 1/(N·s)) from a generator seeded as flatlm documents
(``noise_seed(seed, t)``: ``(seed << 32) | t``), each tensor in the optimizer's group order.
Its switches turn on, one at a time, each way pytorch_optimizer's class differs from the paper
(and the authors' JAX code's update order), so the tests show every difference exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import BSAMBase, create
from helpers.optim import (
    assert_bitwise_equal,
    ce,
    check_resume_mid_training,
    grad_at,
    make_batch,
    make_mlp,
    make_spy,
    params_of,
)

N, LR, RHO, WD, DAMPING, S0, SEED, STEPS = 40, 0.05, 0.03, 0.02, 0.1, 1.5, 7, 6
BETAS = (0.8, 0.95)
SPEC = f"bsam:num_data={N},damping={DAMPING},s0={S0},seed={SEED}"
PAPER = {"noise": "paper", "restore": True, "momentum": "paper", "scale": "paper", "order": "paper"}
#: pytorch_optimizer 4.1's BSAM: each key one difference from the paper.
PTO = {"noise": "pto", "restore": False, "momentum": "pto", "scale": "pto", "order": "paper"}


def _batches(n=STEPS, seed=30):
    return [make_batch(seed=seed + t) for t in range(n)]


def reference(model, names, decay, batches, *, s0=S0, **switches):
    """Algorithm 1 on {name: tensor} in float64; ``names`` in the optimizer's group order,
    ``decay[name]`` the tensor's δ. ``switches`` (see PTO) select pytorch_optimizer's forms."""
    how = {**PAPER, **switches}
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    s = {n: torch.full_like(v, s0) for n, v in w.items()}
    b1, b2 = BETAS
    for t, (x, y) in enumerate(batches):
        if how["noise"] == "paper":  # std √(1/(N s)), the documented generator
            gen = torch.Generator().manual_seed(((SEED & 0x7FFFFFFF) << 32) | t)
            e = {n: torch.randn(w[n].shape, generator=gen, dtype=w[n].dtype) for n in names}
            e = {n: e[n] * torch.sqrt(1.0 / (N * s[n])) for n in names}
        else:  # theirs: std 1/(N s), torch's global generator
            e = {n: torch.normal(0.0, 1.0 / (N * s[n])) for n in names}
        noisy = {n: w[n] + e[n] for n in w}
        g = grad_at(model, noisy, x, y)
        eps = {n: RHO * g[n] / s[n] for n in w}
        origin = w if how["restore"] else noisy  # theirs never takes e (or ε) back out
        point = {n: origin[n] + eps[n] for n in w}
        g_eps = grad_at(model, point, x, y)
        for n in names:
            d = decay[n]
            if how["momentum"] == "paper":
                m[n] = b1 * m[n] + (1 - b1) * (g_eps[n] + d * w[n])
            else:  # theirs: an average of δ·g_ε
                m[n] = b1 * m[n] + (1 - b1) * (d * g_eps[n])
            if how["scale"] == "paper":
                h = torch.sqrt(s[n]) * g[n].abs() + d + DAMPING
            else:  # theirs: from g_ε, squared
                h = (torch.sqrt(s[n]) * g_eps[n].abs() + d + DAMPING) ** 2
            new_s = b2 * s[n] + (1 - b2) * h
            # the paper divides by the new s; the authors' JAX code steps θ before updating s
            divisor = new_s if how["order"] == "paper" else s[n]
            base = w[n] if how["restore"] else point[n]
            w[n] = base - LR * m[n] / divisor
            s[n] = new_s
    return w


def _max_diff(model, w):
    return max(float((p.detach() - w[n]).abs().max()) for n, p in model.named_parameters())


def _groups_of(model):
    """flatlm's decay groups for the MLP: the weights (δ = WD), then the biases (δ = 0)."""
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    names += [n for n, p in model.named_parameters() if p.dim() < 2]
    return names, {n: (WD if n.endswith("weight") else 0.0) for n in names}


def _ours(model, batches, spec=SPEC, **kw):
    opt = create(spec, model, rho=RHO, lr=LR, betas=BETAS, weight_decay=WD, **kw)
    for x, y in batches:
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    return opt


def test_bsam_equals_algorithm_1_in_float64():
    model = make_mlp()
    names, decay = _groups_of(model)
    ref = reference(make_mlp(), names, decay, _batches())
    opt = _ours(model, _batches())
    assert len(opt.param_groups) == 2 and len(names) == 4
    assert _max_diff(model, ref) < 1e-12
    # the scale s is the one the reference ends with too (state "scale")
    assert all(float(opt.base_optimizer.state[p]["scale"].min()) > 0 for p in model.parameters())


def test_each_step_of_algorithm_1_matters_to_the_comparison():
    # the reference with the authors' update order (θ with the old s) is not what flatlm does:
    # the comparison above can tell the two apart (and so each line it checks).
    model = make_mlp()
    names, decay = _groups_of(model)
    _ours(model, _batches())
    authors = reference(make_mlp(), names, decay, _batches(), order="authors")
    assert _max_diff(model, authors) > 1e-6


def test_micro_batches_draw_one_noise_for_the_whole_step():
    model = make_mlp()
    names, decay = _groups_of(model)
    opt = create(SPEC, model, rho=RHO, lr=LR, betas=BETAS, weight_decay=WD)
    for x, y in _batches():
        opt.step(
            forward=lambda mb: model(mb[0]),
            loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]),
            micro_batches=[(x[:8], y[:8]), (x[8:], y[8:])],
        )
    assert _max_diff(model, reference(make_mlp(), names, decay, _batches())) < 1e-12


# --- pytorch_optimizer's BSAM, run as published ------------------------------------------------


def _theirs(model, batches, seed=11):
    sam = pytest.importorskip(
        "pytorch_optimizer.optimizer.sam", reason="pytorch_optimizer is not installed"
    )
    opt = sam.BSAM(
        model.parameters(),
        num_data=N,
        lr=LR,
        betas=BETAS,
        weight_decay=WD,
        rho=RHO,
        damping=DAMPING,
    )
    # Their first step fails unless every parameter already has a .grad (state is made only
    # for parameters with one): a zero gradient, as a backward before training would leave.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.manual_seed(seed)  # their noise comes from torch's global generator
    for x, y in batches:

        def closure(x=x, y=y):
            opt.zero_grad(set_to_none=False)
            loss = ce(y)(model(x))
            loss.backward()
            return loss

        opt.step(closure)


def _reference_like_theirs(seed=11, **switches):
    model = make_mlp()
    names = [n for n, _ in model.named_parameters()]  # one group, δ on every tensor
    torch.manual_seed(seed)
    return reference(model, names, dict.fromkeys(names, WD), _batches(), s0=1.0, **switches)


def test_pytorch_optimizers_bsam_equals_the_reference_with_its_four_differences():
    model = make_mlp()
    _theirs(model, _batches())
    assert _max_diff(model, _reference_like_theirs(**PTO)) < 1e-10


@pytest.mark.parametrize("difference", ["noise", "restore", "momentum", "scale"])
def test_each_of_pytorch_optimizers_differences_changes_the_result(difference):
    # the reference with all four of theirs but this one back as the paper has it: not theirs
    model = make_mlp()
    _theirs(model, _batches())
    switches = {**PTO, difference: PAPER[difference]}
    assert _max_diff(model, _reference_like_theirs(**switches)) > 1e-6


# --- what the engine guarantees ------------------------------------------------------------------


def test_the_base_optimizer_steps_from_theta_restored_bit_for_bit():
    model = make_mlp()
    spy = make_spy(BSAMBase)
    opt = create(SPEC, model.parameters(), base_optimizer=spy, rho=RHO, lr=LR)
    for x, y in _batches(3):
        before = params_of(model)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        assert_bitwise_equal(opt.base_optimizer.seen_params[-1], before)


def test_the_noise_leaves_the_dropout_generator_alone():
    # bSAM's noise has its own generator: torch's global one advances by one forward's dropout,
    # as for any method (the perturbed pass replays the clean pass's masks).
    model = make_mlp(dropout=0.3)
    x, y = make_batch()
    opt = create(SPEC, model.parameters(), rho=RHO, lr=LR)
    torch.manual_seed(4)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    after_step = torch.get_rng_state()
    torch.manual_seed(4)
    model(x)
    assert torch.equal(after_step, torch.get_rng_state())


def test_a_state_dict_round_trip_mid_training_is_bit_exact():
    torch.manual_seed(0)
    _, resumed = check_resume_mid_training(
        lambda seed: make_mlp(seed=seed, dropout=0.1),
        lambda model: create(SPEC, model, rho=RHO, lr=LR, weight_decay=WD),
        _batches(6, seed=110),
        split=3,
        global_rng=True,  # dropout draws from torch's generator; bSAM's noise does not
    )
    assert resumed.param_groups[0]["noise_draws"] == 6  # 3 loaded, 3 drawn


def test_rho_zero_is_one_plain_pass_of_the_base_update_without_noise():
    model, alone = make_mlp(), make_mlp()
    opt = create(SPEC, model.parameters(), rho=0.0, lr=LR, weight_decay=WD)
    base = BSAMBase(alone.parameters(), num_data=N, lr=LR, weight_decay=WD, s0=S0)
    calls = {"n": 0}

    def forward(x):
        calls["n"] += 1
        return model(x)

    for x, y in _batches(4):
        opt.step(forward=lambda x=x: forward(x), loss_fn=ce(y))
        base.zero_grad()
        ce(y)(alone(x)).backward()
        base.step()
    assert calls["n"] == 4
    assert opt.step_counts["plain"] == 4
    assert_bitwise_equal(params_of(model), params_of(alone))
    assert opt.param_groups[0]["noise_draws"] == 0


def test_a_policys_plain_steps_draw_no_noise_and_a_rho_window_switches_bsam_on_and_off():
    from flatlm.optim.schedules import build_rho_schedule

    model = make_mlp()
    opt = create(SPEC + ",policy=interval,every=2", model.parameters(), rho=RHO, lr=LR)
    for x, y in _batches(4):
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    assert opt.step_counts == {"fresh": 2, "reuse": 0, "plain": 2}
    assert opt.param_groups[0]["noise_draws"] == 2  # one draw per fresh step only
    other = make_mlp()
    windowed = create(SPEC, other.parameters(), rho=RHO, lr=LR)
    schedule = build_rho_schedule(windowed, "window:0:0.5", 4)  # ρ in the first half only
    for x, y in _batches(4):
        windowed.step(forward=lambda x=x: other(x), loss_fn=ce(y))
        schedule.step()
    assert [g["rho"] for g in windowed.param_groups] == [0.0]
    assert windowed.step_counts == {"fresh": 2, "reuse": 0, "plain": 2}
    assert windowed.param_groups[0]["noise_draws"] == 2


def test_aesam_decides_on_the_noisy_clean_pass_and_steps_from_theta_either_way():
    model = make_mlp()
    spec = SPEC + ",policy=aesam,aesam_c_start=0.5,aesam_c_end=0.5"
    opt = create(spec, model.parameters(), base_optimizer=make_spy(BSAMBase), rho=RHO, lr=LR)
    for x, y in _batches(6):
        before = params_of(model)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        assert_bitwise_equal(opt.base_optimizer.seen_params[-1], before)
    counts = opt.step_counts
    assert counts["fresh"] > 0 and counts["plain"] > 0 and counts["fresh"] + counts["plain"] == 6
    assert opt.param_groups[0]["noise_draws"] == 6  # every clean pass was noisy


def test_the_registry_builds_bsam_over_its_own_base_and_reads_its_scale():
    model = make_mlp()
    opt = create(SPEC, model.parameters())
    assert isinstance(opt.base_optimizer, BSAMBase)
    assert opt.defaults["rho"] == 0.01 and opt.param_groups[0]["lr"] == 0.5
    x, y = make_batch()
    ce(y)(model(x)).backward()
    eps = opt.perturbation()  # ε = ρ·g/s with s = s0 before the first step, not of length ρ
    for p, e in zip(model.parameters(), eps, strict=True):
        torch.testing.assert_close(e, 0.01 * p.grad / S0, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("spec", "kw", "match"),
    [
        ("bsam", {}, "needs num_data=N"),
        ("bsam:num_data=0", {}, "num_data must be a whole number > 0"),
        (SPEC + ",damping=-1", {}, None),
        (f"bsam:num_data={N},damping=-0.5", {}, "damping must be a finite number >= 0"),
        (f"bsam:num_data={N},s0=0", {}, "s0"),
        (f"bsam:num_data={N},seed=-1", {}, "seed must be"),
        (f"bsam:num_data={N}", {"betas": (0.9, 1.0)}, "betas must be"),
        (f"bsam:num_data={N},perturb_every=2", {}, "reuses a stored perturbation"),
        (f"bsam:num_data={N},ascent_steps=2", {}, "one ascent step"),
    ],
)
def test_bad_options_are_refused_with_the_fix(spec, kw, match):
    model = make_mlp()
    if match is None:  # given twice: the registry's own error
        with pytest.raises(ValueError, match="given twice"):
            create(spec, model.parameters(), **kw)
        return
    with pytest.raises(ValueError, match=match):
        create(spec, model.parameters(), **kw)


def test_another_base_optimizer_is_refused():
    with pytest.raises(TypeError, match="its own base optimizer"):
        create(SPEC, make_mlp().parameters(), base_optimizer=torch.optim.AdamW)


@pytest.mark.parametrize("protocol", ["two_phase", "closure"])
def test_the_classic_protocols_with_add_noise_equal_the_forward_step(protocol):
    model = make_mlp()
    opt = create(SPEC, model, rho=RHO, lr=LR, betas=BETAS, weight_decay=WD)
    for x, y in _batches():
        before = params_of(model)
        assert opt.add_noise() and opt.add_noise()  # the second call changes nothing
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        opt.zero_grad()
        ce(y)(model(x)).backward()
        if protocol == "two_phase":
            assert opt.first_step(zero_grad=True)
            ce(y)(model(x)).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step(lambda x=x, y=y: ce(y)(model(x)).backward())
    names, decay = _groups_of(model)
    assert _max_diff(model, reference(make_mlp(), names, decay, _batches())) < 1e-12


def test_the_classic_protocols_without_add_noise_say_so_and_abort_restores():
    model = make_mlp()
    opt = create(SPEC, model.parameters())
    x, y = make_batch()
    ce(y)(model(x)).backward()
    with pytest.raises(RuntimeError, match=r"call opt.add_noise\(\) before the clean forward"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"opt.add_noise\(\)"):
        opt.step(lambda: ce(y)(model(x)).backward())
    before = params_of(model)
    opt.add_noise()
    opt.abort_step()  # θ copied back
    assert_bitwise_equal(params_of(model), before)
    opt.add_noise()
    with pytest.raises(RuntimeError, match="draws the noise itself"):
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    for g in opt.param_groups:  # a plain step next: no noise
        g["rho"] = 0.0
    assert not opt.add_noise()
    assert_bitwise_equal(params_of(model), before)


def test_torch_distributed_checkpoints_state_init_call_leaves_s_at_s0():
    # get/set_optimizer_state_dict call step() with zero gradients at lr 0 on a fresh optimizer:
    # the state appears at its value before a first step (a zero bSAM step would move s).
    model = make_mlp()
    opt = create(SPEC, model.parameters())
    before = params_of(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    assert opt.step() is None
    assert_bitwise_equal(params_of(model), before)
    for p in model.parameters():
        state = opt.base_optimizer.state[p]
        assert torch.equal(state["scale"], torch.full_like(p, S0))
        assert torch.equal(state["momentum"], torch.zeros_like(p))
    assert opt.param_groups[0]["noise_draws"] == 0
