"""``state_dict()`` in torch's optimizer layout: what ``torch.distributed.checkpoint`` reads.

The layout itself (keys, indices, groups, flatlm's ``flatlm_`` entries); round trips through
``get_optimizer_state_dict``/``set_optimizer_state_dict`` and through ``dcp.save``/``dcp.load``
into a fresh model and optimizer that continue bit for bit; a checkpoint written by flatlm 0.2
(committed, tests/optim/data) that still loads and continues as the 0.2 optimizer did.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from flatlm.optim import create
from flatlm.optim.state_layout import OPTIONAL_SCALARS, PREFIX, SCALARS
from helpers.optim import assert_bitwise_equal, ce, make_batch, make_mlp, params_of

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

V0_2 = Path(__file__).with_name("data") / "state_dict_v0_2_gasam_perturb_every.pt"

# name -> (method, create() keywords): a rule without state, GA-SAM's EMA with a stored
# direction (perturb_every), and a rule that reads AdamW's moments.
CASES = {
    "sam": ("sam", {}),
    "gasam_every2": ("gasam", {"perturb_every": 2}),
    "psam": ("psam", {}),
}
STEPS, MORE = 3, 2  # after 3 steps with perturb_every=2 the next is a reuse, then a fresh one


def _build(case: str, seed: int = 0):
    name, kw = CASES[case]
    model = make_mlp(seed=seed)
    # A model: two groups (decay, no decay) whose order differs from model.parameters().
    return model, create(name, model, rho=0.1, lr=0.01, weight_decay=0.1, **kw)


def _train(model, opt, seeds) -> None:
    for seed in seeds:
        x, y = make_batch(seed=seed)
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))


def _tensors(state_dict) -> list[torch.Tensor]:
    """Every tensor of an optimizer state dict, by parameter then key (any parameter keys)."""
    return [
        entry[key]
        for entry in state_dict["state"].values()
        for key in sorted(entry)
        if torch.is_tensor(entry[key])
    ]


def _trained(case: str):
    model, opt = _build(case)
    _train(model, opt, range(10, 10 + STEPS))
    opt.zero_grad(set_to_none=True)  # as before a checkpoint: no gradient left
    return model, opt


def _continue(model, opt) -> list[torch.Tensor]:
    _train(model, opt, range(20, 20 + MORE))
    return params_of(model)


def _no_flatlm_keys_in_live_groups(opt) -> bool:
    return not any(str(k).startswith(PREFIX) for g in opt.param_groups for k in g)


@pytest.fixture(autouse=True)
def _quiet_single_process():
    # dcp.save/load without a process group say they assume one process; so do we.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# --- the layout ------------------------------------------------------------------------------


def test_the_layout_is_torchs_with_the_methods_state_and_values_prefixed():
    _, opt = _trained("gasam_every2")
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    base = opt.base_optimizer.state_dict()
    # The base optimizer's indices and groups, flatlm's values added to every group.
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in base["param_groups"]]
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    for group, base_group in zip(sd["param_groups"], base["param_groups"], strict=True):
        assert {k: v for k, v in group.items() if not k.startswith(PREFIX)} == base_group
        expected = {PREFIX + s for s in (*SCALARS, *OPTIONAL_SCALARS)}
        assert {k for k in group if k.startswith(PREFIX)} == expected
        assert group["flatlm_method"] == "GASAM"
        assert group["flatlm_skipped_steps"] == 0
        assert group["flatlm_steps_since_fresh_perturbation"] == 1
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    for index, entry in sd["state"].items():
        own = opt.state[params[index]]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"} | {PREFIX + k for k in own}
        assert set(own) == {"grad_sq_ema", "step", "perturb_direction"}
        for key, value in base["state"][index].items():
            assert entry[key] is value
        for key, value in own.items():
            assert entry[PREFIX + key] is value  # GA-SAM's step next to Adam's
    assert _no_flatlm_keys_in_live_groups(opt)


def test_a_plain_adamw_loads_the_base_optimizers_part():
    _, opt = _trained("sam")
    adamw = torch.optim.AdamW([{"params": g["params"]} for g in opt.param_groups])
    adamw.load_state_dict(opt.state_dict())  # torch's layout: flatlm's entries are extra keys
    assert_bitwise_equal(_tensors(adamw.state_dict()), _tensors(opt.base_optimizer.state_dict()))


# --- torch.distributed.checkpoint ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("full", [False, True], ids=["default", "full_state_dict"])
def test_get_and_set_optimizer_state_dict_continue_bit_for_bit(case, full):
    options = StateDictOptions(full_state_dict=full)
    model, opt = _trained(case)
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    assert set(osd) == {"state", "param_groups"}
    assert "fc1.weight" in osd["state"]  # parameter names, not indices
    theta = copy.deepcopy(model.state_dict())

    fresh_model, fresh = _build(case, seed=1)
    fresh_model.load_state_dict(theta)
    set_optimizer_state_dict(fresh_model, fresh, osd, options=options)
    assert _no_flatlm_keys_in_live_groups(fresh)
    assert_bitwise_equal(_tensors(fresh.state_dict()), _tensors(opt.state_dict()))

    assert_bitwise_equal(_continue(fresh_model, fresh), _continue(model, opt))
    assert_bitwise_equal(_tensors(fresh.state_dict()), _tensors(opt.state_dict()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_dcp_save_and_load_into_a_fresh_model_and_optimizer_continue_bit_for_bit(case, tmp_path):
    model, opt = _trained(case)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=tmp_path,
    )

    fresh_model, fresh = _build(case, seed=1)
    # The places to load into: a fresh optimizer has none of its own state yet, so
    # get_optimizer_state_dict creates it (step() without arguments; see the engine).
    target = {
        "model": get_model_state_dict(fresh_model),
        "optim": get_optimizer_state_dict(fresh_model, fresh),
    }
    dcp.load(target, checkpoint_id=tmp_path)
    set_model_state_dict(fresh_model, target["model"])
    set_optimizer_state_dict(fresh_model, fresh, target["optim"])
    assert _no_flatlm_keys_in_live_groups(fresh)
    assert fresh.policy.state_dict() == opt.policy.state_dict()

    assert_bitwise_equal(_continue(fresh_model, fresh), _continue(model, opt))
    assert_bitwise_equal(_tensors(fresh.state_dict()), _tensors(opt.state_dict()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_reading_a_checkpoint_changes_nothing(case):
    """SAM keeps no state of its own, so torch's state initialisation calls ``step()`` on a
    trained SAM too; it must leave AdamW's moments and count alone."""
    model, opt = _trained(case)
    twin, twin_opt = _trained(case)
    get_optimizer_state_dict(model, opt)
    get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert all(p.grad is None for p in model.parameters())
    assert_bitwise_equal(_tensors(opt.state_dict()), _tensors(twin_opt.state_dict()))
    assert_bitwise_equal(_continue(model, opt), _continue(twin, twin_opt))


def test_the_state_made_for_a_fresh_gasam_reads_as_none_yet():
    """The method's part of the state torch's initialisation makes (GA-SAM's EMA, the stored
    direction) is zeros, which the next step reads as no state: only AdamW's own zero step at
    lr 0 (what torch does to any optimizer) differs from a fresh optimizer."""
    model, opt = _build("gasam_every2")
    get_optimizer_state_dict(model, opt)
    assert {k for st in opt.state.values() for k in st} == {
        "grad_sq_ema",
        "step",
        "perturb_direction",
    }
    twin, twin_opt = _build("gasam_every2")
    for p in twin.parameters():  # torch's initialisation of the base optimizer alone
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in twin_opt.param_groups]
    for g in twin_opt.param_groups:
        g["lr"] = 0.0
    twin_opt.base_optimizer.step()
    for g, lr in zip(twin_opt.param_groups, lrs, strict=True):
        g["lr"] = lr
    assert_bitwise_equal(params_of(model), params_of(twin))
    assert_bitwise_equal(_continue(model, opt), _continue(twin, twin_opt))


def test_step_without_arguments_still_refuses_a_users_call():
    model, opt = _trained("sam")
    x, y = make_batch()
    ce(y)(model(x)).backward()
    with pytest.raises(TypeError, match="needs forward= and loss_fn="):
        opt.step()  # lr > 0 and a real gradient: not torch's state initialisation
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(TypeError, match="needs forward= and loss_fn="):
        opt.step()  # zero gradients, but lr > 0


def test_dcp_flattening_keeps_the_prefixed_keys_whole():
    """``flatten_optimizer_state_dict`` joins keys with dots; flatlm's prefix has none. Loading
    such a dict rebuilds the groups from the live optimizer's keys, which drops flatlm's values:
    refused, saying so."""
    model, opt = _trained("gasam_every2")
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    flat = get_optimizer_state_dict(model, opt, options=options)
    assert "state.fc1.weight.flatlm_grad_sq_ema" in flat
    assert "state.fc1.weight.flatlm_step" in flat and "state.fc1.weight.step" in flat
    assert flat["param_groups.fc1.weight.flatlm_method"] == "GASAM"
    fresh_model, fresh = _build("gasam_every2", seed=1)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True"):
        set_optimizer_state_dict(fresh_model, fresh, flat, options=options)


# --- refusals --------------------------------------------------------------------------------


def test_a_state_dict_of_another_method_is_refused_by_name():
    model, opt = _trained("sam")
    _, gasam = _build("gasam_every2")
    with pytest.raises(ValueError, match="state dict is for SAM, cannot load it into GASAM"):
        gasam.load_state_dict(opt.state_dict())
    osd = get_optimizer_state_dict(model, opt)
    fresh_model, fresh = _build("gasam_every2", seed=1)
    with pytest.raises(ValueError, match="state dict is for SAM, cannot load it into GASAM"):
        set_optimizer_state_dict(fresh_model, fresh, osd)
    legacy = torch.load(V0_2, weights_only=True)["optimizer"]
    with pytest.raises(ValueError, match="state dict is for GASAM, cannot load it into SAM"):
        opt.load_state_dict(legacy)


def test_a_plain_torch_optimizers_state_dict_is_refused_with_the_way_to_load_it():
    model, opt = _trained("sam")
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"no 'flatlm_method'.*opt\.base_optimizer"):
        opt.load_state_dict(adamw.state_dict())


# --- flatlm 0.2's layout ---------------------------------------------------------------------


def test_a_checkpoint_written_by_flatlm_0_2_loads_and_continues_as_it_did():
    """tests/optim/data/make_state_dict_v0_2.py wrote it with flatlm 0.2 (GA-SAM,
    perturb_every=2, 3 steps), with the next two batches and the parameters 0.2 reached."""
    torch.set_num_threads(1)  # as when it was written
    ckpt = torch.load(V0_2, weights_only=True)
    saved = ckpt["optimizer"]
    assert ckpt["flatlm_version"] == "0.2.0" and set(saved) >= {"base", "method_state"}
    spec = dict(ckpt["spec"])
    model = make_mlp(seed=3)
    model.load_state_dict(ckpt["model"])
    opt = create(spec.pop("name"), model, **spec)
    opt.load_state_dict(saved)
    assert _no_flatlm_keys_in_live_groups(opt)

    # Everything it held, now in torch's layout.
    sd = opt.state_dict()
    assert sd["param_groups"][0]["flatlm_steps_since_fresh_perturbation"] == 1
    for index, entry in sd["state"].items():
        for key, value in saved["base"]["state"][index].items():
            assert torch.equal(entry[key], value)
        for key, value in saved["method_state"][index].items():
            assert torch.equal(entry[PREFIX + key], value)
    assert len(sd["state"]) == len(saved["base"]["state"]) == len(saved["method_state"])

    # A reused step, then a fresh one, as 0.2 took them in memory.
    x0, y0 = ckpt["batches"][0]
    probe = copy.deepcopy(model)
    loss = ce(y0)(probe(x0))
    loss.backward()
    now = [loss.detach(), *(p.grad for p in probe.parameters())]
    same_rounding = all(torch.equal(a, b) for a, b in zip(ckpt["probe"], now, strict=True))
    for (x, y), expected in zip(ckpt["batches"], ckpt["expected_params"], strict=True):
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        if same_rounding:  # this machine rounds float64 as the recording one did
            assert_bitwise_equal(params_of(model), expected)
        else:  # another CPU kind: the same trajectory up to float64 rounding
            for a, b in zip(params_of(model), expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --- non-zero optimizer-wide values through every round trip ---------------------------------

SKIPPED, SINCE_FRESH = 2, 2  # what _with_scalars feeds: counted by hand, not read from flatlm
COUNTS = {"fresh": 3, "reuse": 1, "plain": 0}  # the two skipped fresh steps, a fresh, a reuse


def _with_scalars():
    """GA-SAM, perturb_every=2, fed two NaN batches (both skipped, so the next step is fresh),
    then a fresh step and a reuse: 2 skipped steps, 2 steps since the fresh perturbation."""
    model, opt = _build("gasam_every2")
    x, y = make_batch(seed=30)
    nan_x = torch.full_like(x, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NonFiniteStepWarning, twice
        for _ in range(SKIPPED):
            opt.step(forward=lambda: model(nan_x), loss_fn=ce(y))
    _train(model, opt, range(31, 33))
    opt.zero_grad(set_to_none=True)
    assert opt.skipped_steps == SKIPPED and opt.policy.since_fresh == SINCE_FRESH
    return model, opt


def _same_scalars(fresh) -> None:
    assert fresh.skipped_steps == SKIPPED
    assert fresh.policy.since_fresh == SINCE_FRESH
    assert fresh.step_counts == COUNTS


def test_non_zero_scalars_survive_state_dict_and_load_state_dict():
    _, opt = _with_scalars()
    sd = opt.state_dict()
    assert {g["flatlm_skipped_steps"] for g in sd["param_groups"]} == {SKIPPED}
    assert {g["flatlm_steps_since_fresh_perturbation"] for g in sd["param_groups"]} == {SINCE_FRESH}
    _, fresh = _build("gasam_every2", seed=1)
    fresh.load_state_dict(copy.deepcopy(sd))
    _same_scalars(fresh)


def test_non_zero_scalars_survive_flatlm_0_2s_layout():
    legacy = torch.load(V0_2, weights_only=True)
    saved, spec = legacy["optimizer"], dict(legacy["spec"])
    saved = {**saved, "skipped_steps": SKIPPED, "steps_since_fresh_perturbation": SINCE_FRESH}
    opt = create(spec.pop("name"), make_mlp(seed=3), **spec)
    opt.load_state_dict(saved)
    assert opt.skipped_steps == SKIPPED and opt.policy.since_fresh == SINCE_FRESH


@pytest.mark.parametrize("full", [False, True], ids=["default", "full_state_dict"])
def test_non_zero_scalars_survive_get_and_set_optimizer_state_dict(full):
    options = StateDictOptions(full_state_dict=full)
    model, opt = _with_scalars()
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    fresh_model, fresh = _build("gasam_every2", seed=1)
    set_optimizer_state_dict(fresh_model, fresh, osd, options=options)
    _same_scalars(fresh)


def test_non_zero_scalars_survive_dcp_save_and_load(tmp_path):
    model, opt = _with_scalars()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    fresh_model, fresh = _build("gasam_every2", seed=1)
    target = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(target, checkpoint_id=tmp_path)
    set_optimizer_state_dict(fresh_model, fresh, target["optim"])
    _same_scalars(fresh)
