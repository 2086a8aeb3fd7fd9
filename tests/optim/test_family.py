"""WSAM, GSAM, FriendlySAM and GCSAM against references written from their papers and against
pytorch_optimizer 4.1's implementations.

Each paper reference is a float64 loop written here with torch.func (not with flatlm's code),
SGD without momentum as the base (w ← w − η·update), so the gradient each method hands to the
base optimizer is checked exactly. The pytorch_optimizer comparisons run their classes as
published, with one change named where it is made: their global gradient norm is accumulated
in float32 (``get_global_gradient_norm``), which limits any float64 comparison to ~1e-7; the
tests swap in the same sum in float64 to compare at ~1e-10, and one test keeps theirs as is.
Convention differences are shown, not hidden (docs/algorithms.md names each).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import NonFiniteStepWarning, create
from flatlm.optim.schedules import RhoFollowsLR, build_rho_schedule
from helpers.optim import (
    SpySGD,
    assert_bitwise_equal,
    ce,
    check_resume_mid_training,
    dict_dot,
    dict_norm,
    grad_at,
    make_batch,
    make_mlp,
    params_of,
    poisoned_forward,
    state_tensors,
)

LR, RHO, STEPS = 0.1, 0.3, 7
FAMILY = ["wsam", "gsam", "friendlysam", "gcsam"]


def _batches(n=STEPS, seed=20):
    return [make_batch(seed=seed + t) for t in range(n)]


def _run(spec, model, lr_lambda=None, rho_schedule=None, **kw):
    opt = create(spec, model.parameters(), base_optimizer=torch.optim.SGD, rho=RHO, lr=LR, **kw)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda) if lr_lambda else None
    rho_sched = build_rho_schedule(opt, rho_schedule, STEPS) if rho_schedule else None
    for x, y in _batches():
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        if lr_sched:
            lr_sched.step()
        if rho_sched:
            rho_sched.step()
    return opt


def _reference(update, lr_of=lambda t: LR):
    """Plain-SGD loop: ``update(t, w, g, x, y, memo)`` gives the gradient the base steps with."""
    model = make_mlp()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    memo: dict = {}
    for t, (x, y) in enumerate(_batches()):
        g = grad_at(model, w, x, y)
        u = update(t, w, g, x, y, memo, model)
        w = {n: w[n] - lr_of(t) * u[n] for n in w}
    return w


def _close(model, w, atol=1e-12):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n], rtol=0, atol=atol)


def _perturbed(model, w, d, rho, x, y):
    """∇L(w + ρ·d/‖d‖)."""
    n = dict_norm(d)
    return grad_at(model, {k: w[k] + rho * d[k] / n for k in w}, x, y)


# --- the papers' updates -------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.9, 0.5, 0.2])
def test_wsam_is_the_gradient_of_the_weighted_sharpness(gamma):
    # Yue et al. 2023: L + γ/(1−γ)·(L(w+ε) − L(w)), so g + γ/(1−γ)·(g_s − g); γ = ½ is SAM.
    def update(t, w, g, x, y, memo, model):
        gs = _perturbed(model, w, g, RHO, x, y)
        k = gamma / (1 - gamma)
        return {n: g[n] + k * (gs[n] - g[n]) for n in g}

    model = make_mlp()
    _run(f"wsam:gamma={gamma}", model)
    _close(model, _reference(update))
    if gamma == 0.5:  # and γ = ½ is SAM, bit for bit up to rounding
        sam = make_mlp()
        _run("sam", sam)
        for p, q in zip(model.parameters(), sam.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def _gsam_update(alpha, rho_of):
    # Zhuang et al. 2022, Algorithm 1: ε from the clean g, then g_s − α·g_⊥ with
    # g_⊥ = g − (⟨g, g_s⟩/‖g_s‖²)·g_s, the part of g orthogonal to g_s.
    def update(t, w, g, x, y, memo, model):
        gs = _perturbed(model, w, g, rho_of(t), x, y)
        c = dict_dot(g, gs) / dict_dot(gs, gs)
        return {n: gs[n] - alpha * (g[n] - c * gs[n]) for n in g}

    return update


def test_gsam_descends_on_the_sam_gradient_minus_the_orthogonal_part_of_the_clean_one():
    model = make_mlp()
    _run("gsam:alpha=0.4", model)
    _close(model, _reference(_gsam_update(0.4, lambda t: RHO)))


@pytest.mark.parametrize("rho_min_fraction", [0.0, 0.25])
def test_gsam_rho_follows_the_learning_rate_schedule(rho_min_fraction):
    # The paper's ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min), lr_min = 0 here.
    decay = lambda t: 1.0 - t / (STEPS + 1)  # noqa: E731
    rho_min = rho_min_fraction * RHO

    def rho_of(t):
        return rho_min + (RHO - rho_min) * decay(t)

    model = make_mlp()
    spec = "lr" if rho_min_fraction == 0 else f"lr:{rho_min_fraction}"
    opt = _run("gsam:alpha=0.3", model, lr_lambda=decay, rho_schedule=spec)
    _close(model, _reference(_gsam_update(0.3, rho_of), lr_of=lambda t: LR * decay(t)))
    assert opt.param_groups[0]["rho"] == pytest.approx(rho_of(STEPS))


def test_friendlysam_perturbs_along_the_gradient_minus_its_ema():
    # Li et al. 2024 and their code (nblt/F-SAM): the first step is SAM's with m = g; then
    # d = g − σ·m_{t−1}, m_t = λ·m_{t−1} + (1 − λ)·g, ε = ρ·d/‖d‖.
    sigma, lmbda = 0.8, 0.6

    def update(t, w, g, x, y, memo, model):
        if t == 0:
            d, memo["m"] = g, dict(g)
        else:
            m = memo["m"]
            d = {n: g[n] - sigma * m[n] for n in g}
            memo["m"] = {n: lmbda * m[n] + (1 - lmbda) * g[n] for n in g}
        return _perturbed(model, w, d, RHO, x, y)

    model = make_mlp()
    opt = _run(f"friendlysam:sigma={sigma},lmbda={lmbda}", model)
    _close(model, _reference(update))
    assert all("friendly_momentum" in opt.state[p] for p in model.parameters())


def _centralized(g):
    # Yong et al. 2020: each weight's row means removed (every dimension but the first).
    return {
        n: v - v.mean(dim=tuple(range(1, v.dim())), keepdim=True) if v.dim() > 1 else v
        for n, v in g.items()
    }


def test_gcsam_perturbs_along_the_centralized_gradient():
    # Hassan et al. 2025: ε = ρ·GC(g)/‖GC(g)‖, the descent gradient g_s as it is.
    def update(t, w, g, x, y, memo, model):
        return _perturbed(model, w, _centralized(g), RHO, x, y)

    model = make_mlp()
    _run("gcsam", model)
    _close(model, _reference(update))
    sam = make_mlp()
    _run("sam", sam)
    assert (
        max((p - q).abs().max() for p, q in zip(model.parameters(), sam.parameters(), strict=True))
        > 1e-6
    )


# --- against pytorch_optimizer 4.1 ---------------------------------------------------------------

pto = pytest.importorskip("pytorch_optimizer", reason="the [bench] extra is not installed")
from pytorch_optimizer.optimizer import sam as pto_sam  # noqa: E402


@pytest.fixture
def float64_norm(monkeypatch):
    """Their global norm with the squares summed in the gradients' dtype (float64), not float32."""

    def norm_sq(param_groups, device=None, *, weight_adaptive=False):
        grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
        return torch.stack([(x * x).sum() for x in grads]).sum().reshape(1)

    monkeypatch.setattr(pto_sam, "get_global_gradient_norm", norm_sq)


def _closure(model, x, y):
    def closure():
        loss = ce(y)(model(x))
        loss.backward()
        return loss

    return closure


def _pto_step(opt, model, x, y):
    """Their documented protocol for SAM/FriendlySAM: clean backward, then step(closure)."""
    opt.zero_grad(set_to_none=True)
    closure = _closure(model, x, y)
    closure()
    opt.step(closure)


def _wsam_step(opt, model, x, y):
    """WSAM's step(closure) runs the clean pass itself."""
    opt.zero_grad(set_to_none=True)
    opt.step(_closure(model, x, y))


def _max_diff(a, b):
    return max(
        float((p - q).detach().abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def _moved(model, start):
    return max(
        float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start, strict=True)
    )


def _ours(spec, model, batches, **kw):
    opt = create(spec, model.parameters(), base_optimizer=torch.optim.AdamW, rho=RHO, lr=0.01, **kw)
    for x, y in batches:
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    return opt


def test_wsam_equals_pytorch_optimizers_coupled_wsam_and_differs_from_its_decoupled_default(
    float64_norm,
):
    batches = _batches(6, seed=50)
    ours, coupled, decoupled = make_mlp(), make_mlp(), make_mlp()
    start = params_of(ours)
    _ours("wsam:gamma=0.8", ours, batches)
    for model, decouple in ((coupled, False), (decoupled, True)):
        ref = pto.WSAM(
            model,
            model.parameters(),
            torch.optim.AdamW,
            rho=RHO,
            gamma=0.8,
            decouple=decouple,
            lr=0.01,
        )
        for x, y in batches:
            _wsam_step(ref, model, x, y)
    assert _moved(ours, start) > 1e-2
    assert _max_diff(ours, coupled) < 1e-10
    # decouple=True (their default, the authors' code's): AdamW steps with g alone and the
    # sharpness term γ/(1−γ)(g_s − g) is added after it as a plain SGD step of size lr.
    assert _max_diff(ours, decoupled) > 1e-4


def test_wsam_decoupled_equals_coupled_under_plain_sgd(float64_norm):
    # The two forms differ only through the base optimizer's state: under plain SGD both are
    # w − lr·(g + γ/(1−γ)(g_s − g)), so their decoupled default matches flatlm there.
    batches = _batches(5, seed=60)
    ours, theirs = make_mlp(), make_mlp()
    opt = create(
        "wsam:gamma=0.7", ours.parameters(), base_optimizer=torch.optim.SGD, rho=RHO, lr=LR
    )
    ref = pto.WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=RHO, gamma=0.7, lr=LR)
    for x, y in batches:
        opt.step(forward=lambda x=x: ours(x), loss_fn=ce(y))
        _wsam_step(ref, theirs, x, y)
    assert _max_diff(ours, theirs) < 1e-10


def test_gsam_equals_pytorch_optimizers_gsam_with_its_proportion_scheduler(float64_norm):
    batches = _batches(6, seed=70)
    decay = lambda t: 1.0 - t / 8  # noqa: E731
    ours, theirs = make_mlp(), make_mlp()
    start = params_of(ours)
    opt = create(
        "gsam:alpha=0.4", ours.parameters(), base_optimizer=torch.optim.AdamW, rho=RHO, lr=0.01
    )
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    rho_sched = RhoFollowsLR(opt, begin=0.1)

    base = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    their_lr = torch.optim.lr_scheduler.LambdaLR(base, decay)
    rho_of_lr = pto.ProportionScheduler(
        their_lr, max_lr=0.01, min_lr=0.0, max_value=RHO, min_value=0.1 * RHO
    )
    ref = pto.GSAM(theirs.parameters(), base, theirs, rho_of_lr, alpha=0.4)
    for x, y in batches:
        opt.step(forward=lambda x=x: ours(x), loss_fn=ce(y))
        lr_sched.step()
        rho_sched.step()
        ref.set_closure(F.cross_entropy, x, y)
        ref.step()
        their_lr.step()
        ref.update_rho_t()
        assert opt.param_groups[0]["rho"] == pytest.approx(ref.rho_t, rel=1e-15)
    assert _moved(ours, start) > 1e-2
    assert _max_diff(ours, theirs) < 1e-10


def test_friendlysam_equals_pytorch_optimizers_friendlysam(float64_norm):
    batches = _batches(6, seed=80)
    ours, theirs = make_mlp(), make_mlp()
    start = params_of(ours)
    _ours("friendlysam:sigma=1,lmbda=0.6", ours, batches)
    ref = pto.FriendlySAM(
        theirs.parameters(), torch.optim.AdamW, rho=RHO, sigma=1.0, lmbda=0.6, lr=0.01
    )
    for x, y in batches:
        _pto_step(ref, theirs, x, y)
    assert _moved(ours, start) > 1e-2
    assert _max_diff(ours, theirs) < 1e-10


def test_friendlysam_with_pytorch_optimizers_float32_norm_agrees_to_float32():
    batches = _batches(6, seed=80)
    ours, theirs = make_mlp(), make_mlp()
    _ours("friendlysam", ours, batches)
    ref = pto.FriendlySAM(theirs.parameters(), torch.optim.AdamW, rho=RHO, lr=0.01)
    for x, y in batches:
        _pto_step(ref, theirs, x, y)
    assert 1e-13 < _max_diff(ours, theirs) < 1e-6


def test_gcsam_normalises_the_centralized_gradient_where_pytorch_optimizer_uses_the_raw_norm(
    float64_norm,
):
    # pytorch_optimizer's GCSAM is SAM(use_gc=True): it takes ‖g‖ before centralising, so its
    # ε = ρ·GC(g)/‖g‖, shorter than the paper's ρ·GC(g)/‖GC(g)‖ (flatlm's). The directions agree.
    model, theirs = make_mlp(), make_mlp()
    x, y = make_batch(seed=90)
    opt = create("gcsam", model.parameters(), rho=RHO, lr=0.01)
    ce(y)(model(x)).backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours_eps = opt.perturbation()

    ref = pto.SAM(theirs.parameters(), torch.optim.AdamW, rho=RHO, use_gc=True, lr=0.01)
    before = params_of(theirs)
    ce(y)(theirs(x)).backward()
    ref.first_step()
    their_eps = [p.detach() - b for p, b in zip(theirs.parameters(), before, strict=True)]
    ratio = dict_norm(_centralized(g)) / dict_norm(g)
    assert ratio < 0.99  # centralising changed the norm
    for e, f in zip(ours_eps, their_eps, strict=True):
        torch.testing.assert_close(e * ratio, f, rtol=0, atol=1e-12)


# --- what the engine guarantees ------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILY)
def test_the_base_optimizer_steps_from_theta_restored_bit_for_bit(name):
    model = make_mlp()
    opt = create(name, model.parameters(), base_optimizer=SpySGD, rho=RHO, lr=LR)
    for x, y in _batches(3):
        before = params_of(model)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        assert_bitwise_equal(opt.base_optimizer.seen_params[-1], before)


@pytest.mark.parametrize("name", [*FAMILY, "bsam:num_data=40"])  # bSAM: its noise and s too
@pytest.mark.parametrize("bad_call", [0, 1])
def test_a_non_finite_pass_skips_the_whole_step(name, bad_call):
    model = make_mlp()
    opt = create(name, model.parameters(), rho=RHO, lr=0.01)
    for x, y in _batches(2):  # FriendlySAM has its EMA by now
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    before, state = params_of(model), state_tensors(opt)
    x, y = make_batch(seed=99)
    with pytest.warns(NonFiniteStepWarning):
        opt.step(forward=poisoned_forward(model, x, bad_call), loss_fn=ce(y))
    assert_bitwise_equal(params_of(model), before)
    assert_bitwise_equal(state_tensors(opt), state)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", FAMILY)
def test_a_state_dict_round_trip_mid_training_is_bit_exact(name):
    check_resume_mid_training(
        lambda seed: make_mlp(seed=seed),
        lambda model: create(name, model.parameters(), rho=RHO, lr=0.05),
        _batches(6, seed=110),
        split=3,
    )


def _wsam_update(gamma):
    def update(t, w, g, x, y, memo, model):
        gs = _perturbed(model, w, g, RHO, x, y)
        return {n: g[n] + gamma / (1 - gamma) * (gs[n] - g[n]) for n in g}

    return update


COMBINING = {
    "wsam:gamma=0.8": _wsam_update(0.8),
    "gsam:alpha=0.4": _gsam_update(0.4, lambda t: RHO),
}


@pytest.mark.parametrize("spec", list(COMBINING))
def test_micro_batches_combine_the_accumulated_gradients(spec):
    # The rule sees the mean clean and perturbed gradients: two halves are the whole batch.
    model = make_mlp()
    opt = create(spec, model.parameters(), base_optimizer=torch.optim.SGD, rho=RHO, lr=LR)
    for x, y in _batches():
        opt.step(
            forward=lambda mb: model(mb[0]),
            loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]),
            micro_batches=[(x[:8], y[:8]), (x[8:], y[8:])],
        )
    _close(model, _reference(COMBINING[spec]))


@pytest.mark.parametrize("spec", list(COMBINING))
def test_the_classic_two_phase_protocol_combines_too(spec):
    model = make_mlp()
    opt = create(spec, model.parameters(), base_optimizer=torch.optim.SGD, rho=RHO, lr=LR)
    for x, y in _batches():
        ce(y)(model(x)).backward()
        opt.first_step(zero_grad=True)
        ce(y)(model(x)).backward()
        opt.second_step(zero_grad=True)
    _close(model, _reference(COMBINING[spec]))


def test_bad_options_are_refused_with_the_fix():
    model = make_mlp()
    with pytest.raises(ValueError, match="gamma must be in"):
        create("wsam:gamma=1", model.parameters())
    with pytest.raises(ValueError, match="lmbda must be in"):
        create("friendlysam:lmbda=1", model.parameters())
    with pytest.raises(ValueError, match="reuses a stored perturbation"):
        create("gsam:perturb_every=2", model.parameters())
    with pytest.raises(ValueError, match="reuses a stored perturbation"):
        create("wsam:policy=looksam,every=3", model.parameters())
    with pytest.raises(ValueError, match="sigma"):
        create("gcsam:sigma=1", model.parameters())
    with pytest.raises(ValueError, match="FROM"):
        create("gsam:rho_schedule=lr:2", model.parameters())
    create("gsam:policy=interval,every=2", model.parameters())  # plain steps in between: fine
