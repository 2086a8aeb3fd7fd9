"""Step policies (flatlm.optim.policies) and the ρ = 0 rule, against hand-written references.

Each reference is a float64 loop of the published algorithm written here with torch.func, not
with the engine's code: SGD without momentum as the base (w ← w − η·update), so the update
direction the policy hands to the base optimizer is checked exactly.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import BSAMBase, create
from flatlm.optim.policies import AESAM, LookSAM, make_policy
from helpers.optim import (
    OWN_BASE_METHODS,
    SAM_METHODS,
    assert_bitwise_equal,
    ce,
    check_resume_mid_training,
    dict_dot,
    dict_norm,
    grad_at,
    make_batch,
    make_mlp,
    params_of,
)

LR, RHO, STEPS = 0.1, 0.3, 9


def _sam_grad(model, w, g, x, y):
    n = dict_norm(g)
    return grad_at(model, {k: w[k] + RHO * g[k] / n for k in w}, x, y)


def _batches():
    return [make_batch(seed=20 + t) for t in range(STEPS)]


def _run(spec, model, **kw):
    opt = create(spec, model.parameters(), base_optimizer=torch.optim.SGD, rho=RHO, lr=LR, **kw)
    for x, y in _batches():
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    return opt


def _reference(decide, combine=None):
    """Plain-SGD loop: ``decide(t, w, g)`` → "fresh"/"reuse"/"plain"; ``combine`` for LookSAM."""
    model = make_mlp()
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    kinds, memo = [], {}
    for t, (x, y) in enumerate(_batches()):
        g = grad_at(model, w, x, y)
        kind = decide(t, w, g, memo)
        if kind == "fresh":
            update = _sam_grad(model, w, g, x, y)
            if combine:
                combine(memo, g, update)
        elif kind == "reuse":
            gv = memo["gv"]
            coef = memo["alpha"] * dict_norm(g) / dict_norm(gv)
            update = {n: g[n] + coef * gv[n] for n in g}
        else:
            update = g
        w = {n: w[n] - LR * update[n] for n in w}
        kinds.append(kind)
    return w, kinds


def _close(model, w):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n], rtol=0, atol=1e-12)


def _counts(kinds):
    return {k: kinds.count(k) for k in ("fresh", "reuse", "plain")}


def test_interval_is_composers_fresh_on_t_plus_1_multiple_of_k_plain_otherwise():
    model = make_mlp()
    opt = _run("sam:policy=interval,every=3", model)
    w, kinds = _reference(lambda t, w, g, m: "fresh" if (t + 1) % 3 == 0 else "plain")
    _close(model, w)
    assert opt.step_counts == _counts(kinds) == {"fresh": 3, "reuse": 0, "plain": 6}


def test_looksam_matches_the_published_update_with_its_stored_orthogonal_part():
    alpha, k = 0.7, 4

    def combine(memo, g, gs):
        coef = dict_dot(gs, g) / dict_dot(g, g)
        memo["gv"] = {n: gs[n] - coef * g[n] for n in g}
        memo["alpha"] = alpha

    model = make_mlp()
    opt = _run(f"sam:policy=looksam,every={k},looksam_alpha={alpha}", model)
    w, kinds = _reference(lambda t, w, g, m: "fresh" if t % k == 0 else "reuse", combine)
    _close(model, w)
    assert opt.step_counts == _counts(kinds) == {"fresh": 3, "reuse": 6, "plain": 0}


def _aesam_decide(delta, c_start, c_end, total):
    def decide(t, w, g, memo):
        sq = dict_norm(g) ** 2
        mu = delta * memo.get("mu", 0.0) + (1 - delta) * sq
        var = delta * memo.get("var", 0.0) + (1 - delta) * (sq - mu) ** 2
        memo["mu"], memo["var"] = mu, var
        c = c_start + (c_end - c_start) * min(t / total, 1.0)
        return "fresh" if sq >= mu + c * math.sqrt(var) else "plain"

    return decide


def test_aesam_matches_its_running_statistics_and_threshold_schedule():
    model = make_mlp()
    opt = _run("sam:policy=aesam,total_steps=9,aesam_delta=0.6", model)
    w, kinds = _reference(_aesam_decide(0.6, 1.0, -1.0, 9))
    _close(model, w)
    assert opt.step_counts == _counts(kinds)
    assert 0 < opt.step_counts["fresh"] < STEPS and opt.step_counts["plain"] > 0  # both branches


def test_rst_draws_from_its_own_seeded_generator_and_leaves_torchs_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model = make_mlp()
    torch.set_rng_state(before)
    opt = _run("sam:policy=rst,rst_p=0.5,rst_p_end=0.9,total_steps=9,policy_seed=3", model)
    assert torch.equal(torch.get_rng_state(), before)

    def decide(t, w, g, memo):
        p = 0.5 + 0.4 * min(t / 9, 1.0)
        return "fresh" if random.Random(f"3:{t}").random() < p else "plain"

    w, kinds = _reference(decide)
    _close(model, w)
    assert opt.step_counts == _counts(kinds)
    assert 0 < opt.step_counts["fresh"] < STEPS


@pytest.mark.parametrize("name", SAM_METHODS)
def test_rho_zero_is_the_plain_base_step_with_one_pass_for_every_method(name):
    x, y = make_batch()
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]
    ref = make_mlp()
    if name in OWN_BASE_METHODS:  # bsam's own base: its update with g for both g and g_ε
        base = BSAMBase(ref.parameters(), num_data=64, lr=0.05)
    else:
        base = torch.optim.AdamW(ref.parameters(), lr=0.05)
    for _ in range(3):
        base.zero_grad()
        for xb, yb in micro:
            (F.cross_entropy(ref(xb), yb) * 0.5).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1, foreach=True)
        base.step()

    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.0, lr=0.05, max_grad_norm=0.1)
    calls = []
    for _ in range(3):
        opt.step(
            forward=lambda mb: calls.append(1) or model(mb[0]),
            loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]),
            micro_batches=micro,
        )
    assert_bitwise_equal(params_of(model), params_of(ref))
    assert len(calls) == 3 * len(micro)  # one forward–backward per micro-batch
    assert opt.step_counts == {"fresh": 0, "reuse": 0, "plain": 3}
    if name == "gasam":  # a plain step leaves the rule's state (its EMA) as it was: none yet
        assert not any("grad_sq_ema" in st for st in opt.state.values())


def test_rho_zero_in_the_classic_protocols_is_the_plain_step():
    x, y = make_batch()
    ref = make_mlp()
    base = torch.optim.AdamW(ref.parameters(), lr=0.05)
    ce(y)(ref(x)).backward()
    base.step()

    model = make_mlp()
    opt = create("sam", model.parameters(), rho=0.0, lr=0.05)
    ce(y)(model(x)).backward()
    assert opt.first_step() is False  # no second pass needed
    opt.second_step(zero_grad=True)
    assert_bitwise_equal(params_of(model), params_of(ref))

    closure_calls = []
    model2 = make_mlp()
    opt2 = create("sam", model2.parameters(), rho=0.0, lr=0.05)
    ce(y)(model2(x)).backward()
    assert opt2.step(lambda: closure_calls.append(1)) is None
    assert not closure_calls
    assert_bitwise_equal(params_of(model2), params_of(ref))
    assert opt.step_counts == opt2.step_counts == {"fresh": 0, "reuse": 0, "plain": 1}


def test_a_gasam_plain_window_leaves_its_ema_unchanged():
    model = make_mlp()
    opt = create("gasam", model.parameters(), rho=0.1, lr=0.05)
    x, y = make_batch()
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    ema = [st["grad_sq_ema"].clone() for st in opt.state.values()]
    for g in opt.param_groups:
        g["rho"] = 0.0
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    assert_bitwise_equal([st["grad_sq_ema"] for st in opt.state.values()], ema)


@pytest.mark.parametrize(
    "spec",
    [
        "sam:policy=looksam,every=3",
        "sam:policy=aesam,total_steps=12",
        "sam:policy=rst,rst_p=0.4,policy_seed=7",
        "sam:policy=interval,every=2",
        "sam:perturb_every=3",
    ],
)
def test_resume_mid_policy_is_bit_exact(spec):
    opt, resumed = check_resume_mid_training(
        lambda seed: make_mlp(seed=seed),
        lambda model: create(spec, model.parameters(), rho=RHO, lr=0.05),
        [make_batch(seed=40 + t) for t in range(8)],
        split=4,  # mid-cycle: LookSAM/perturb_every hold a stored tensor
    )
    assert resumed.step_counts == opt.step_counts
    assert resumed.policy.state_dict() == opt.policy.state_dict()


def test_a_checkpoint_without_counts_or_policy_still_loads():
    model = make_mlp()
    opt = create("sam", model.parameters(), rho=RHO, lr=0.05)
    x, y = make_batch()
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    old = opt.state_dict()
    for g in old["param_groups"]:
        for key in ("flatlm_fresh_steps", "flatlm_reuse_steps", "flatlm_plain_steps"):
            del g[key]
        del g["flatlm_policy"]
    fresh = create("sam", make_mlp().parameters(), rho=RHO, lr=0.05)
    fresh.load_state_dict(old)
    assert fresh.step_counts == {"fresh": 0, "reuse": 0, "plain": 0}


def test_counts_survive_a_round_trip_with_nonzero_values():
    model = make_mlp()
    opt = create("sam:policy=interval,every=2", model.parameters(), rho=RHO, lr=0.05)
    for t in range(5):
        x, y = make_batch(seed=t)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
    fresh = create("sam:policy=interval,every=2", make_mlp().parameters(), rho=RHO, lr=0.05)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.step_counts == opt.step_counts == {"fresh": 2, "reuse": 0, "plain": 3}
    assert fresh.policy.t == 5


@pytest.mark.parametrize(
    ("spec", "counts"),
    [
        ("sam:policy=looksam,every=2", {"fresh": 3, "reuse": 2, "plain": 0}),
        ("sam:policy=interval,every=2", {"fresh": 2, "reuse": 0, "plain": 3}),
        ("fsam:policy=aesam,total_steps=5", None),
        ("sam:policy=rst,rst_p=0.5,policy_seed=4", None),
    ],
)
def test_policies_with_micro_batches_and_fp16_scaler_equal_the_unscaled_full_batch(spec, counts):
    # Scaling by 2^k and unscaling is exact, so the scaled run equals the unscaled one (AE-SAM
    # decides on the unscaled clean gradient, so on the same numbers).
    x, y = make_batch()
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]

    def run(scaler, micro_batches):
        model = make_mlp()
        opt = create(spec, model.parameters(), rho=RHO, lr=0.05)
        for _ in range(5):
            if micro_batches:
                opt.step(
                    forward=lambda mb: model(mb[0]),
                    loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]),
                    micro_batches=micro,
                    grad_scaler=scaler,
                )
            else:
                opt.step(forward=lambda: model(x), loss_fn=ce(y), grad_scaler=scaler)
        return model, opt

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    scaled, opt = run(scaler, True)
    plain, plain_opt = run(None, True)
    assert_bitwise_equal(params_of(scaled), params_of(plain))
    assert opt.step_counts == plain_opt.step_counts == (counts or opt.step_counts)
    assert scaler.get_scale() > 2.0**10  # update() ran every step (growth_interval=1)
    whole, _ = run(None, False)
    for a, b in zip(params_of(whole), params_of(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_policy_specs_are_parsed_strictly():
    with pytest.raises(ValueError, match="takes no option looksam_alpha"):
        create("sam:policy=interval,every=2,looksam_alpha=0.5", make_mlp().parameters())
    with pytest.raises(ValueError, match="unknown step policy"):
        create("sam:policy=lookasm,every=2", make_mlp().parameters())
    with pytest.raises(ValueError, match="total_steps"):
        create("sam:policy=aesam", make_mlp().parameters())
    with pytest.raises(ValueError, match="every=<an integer"):
        create("sam:policy=looksam", make_mlp().parameters())
    with pytest.raises(ValueError, match="momentum"):
        create("msam:policy=interval,every=2", make_mlp().parameters())
    assert isinstance(create("sam:policy=looksam,every=5", make_mlp().parameters()).policy, LookSAM)
    opt = create("fsam:policy=aesam,aesam_c_start=0,aesam_c_end=0", make_mlp().parameters())
    assert isinstance(opt.policy, AESAM)
    assert make_policy(perturb_every=2).name == "reuse_direction"


def test_rho_zero_with_an_fp16_scaler_is_the_plain_scaled_step_and_backs_off_on_overflow():
    """The plain step under GradScaler is torch's recipe: scale, backward, unscale_, clip, step
    (skipped on an overflow), update; here with an overflow at the second step."""
    x, y = make_batch()
    xs = [x, torch.full_like(x, float("inf")), x]  # the middle step overflows

    def loss_of(model, xb):
        return F.cross_entropy(model(xb), y)

    ref = make_mlp()
    base = torch.optim.AdamW(ref.parameters(), lr=0.05)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for xb in xs:
        base.zero_grad()
        ref_scaler.scale(loss_of(ref, xb)).backward()
        ref_scaler.unscale_(base)
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.1, foreach=True)
        ref_scaler.step(base)
        ref_scaler.update()

    model = make_mlp()
    opt = create("sam", model.parameters(), rho=0.0, lr=0.05, max_grad_norm=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for xb in xs:
        opt.step(forward=lambda xb=xb: model(xb), loss_fn=ce(y), grad_scaler=scaler)
    assert_bitwise_equal(params_of(model), params_of(ref))
    assert scaler.get_scale() == ref_scaler.get_scale()
    assert opt.skipped_steps == 1
    assert opt.step_counts == {"fresh": 0, "reuse": 0, "plain": 3}
