"""Bad input to the optimizer API: a clear error naming the problem and the fix, before anything
moves (θ and every state tensor bit for bit as before)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.optim import SAM, FunctionalSAM, create
from flatlm.optim.state_layout import split
from helpers.optim import (
    assert_bitwise_equal,
    ce,
    make_batch,
    make_mlp,
    params_of,
    state_tensors,
)


def _trained(name: str = "sam"):
    x, y = make_batch()
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.2, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    return model, opt, x, y


@pytest.mark.parametrize("call", ["closure", "first_step"])
def test_the_classic_protocols_without_a_clean_backward_say_so(call):
    model, opt, x, y = _trained()
    opt.zero_grad(set_to_none=True)  # the user forgot loss.backward()
    before, state = params_of(model), state_tensors(opt)

    def closure():
        loss = ce(y)(model(x))
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"no gradient on any parameter.*step\(forward="):
        opt.step(closure) if call == "closure" else opt.first_step()
    assert_bitwise_equal(params_of(model), before)
    assert_bitwise_equal(state_tensors(opt), state)


def test_sparse_gradients_are_refused_before_anything_moves():
    emb = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 3)
    opt = SAM([*emb.parameters(), *head.parameters()], rho=0.1, lr=0.01)
    idx, y = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    before = [p.detach().clone() for p in (*emb.parameters(), *head.parameters())]
    with pytest.raises(TypeError, match=r"sparse gradient.*sparse=False"):
        opt.step(forward=lambda: head(emb(idx)), loss_fn=lambda z: F.cross_entropy(z, y))
    assert_bitwise_equal([p.detach() for p in (*emb.parameters(), *head.parameters())], before)


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (torch.optim.LBFGS, "LBFGS cannot be a base optimizer"),
        (torch.optim.SparseAdam, "SparseAdam"),
    ],
)
def test_bases_that_cannot_work_are_refused_at_construction(base, match):
    with pytest.raises(TypeError, match=match):
        SAM(make_mlp().parameters(), base, lr=0.01)


def _v0_2(sd):
    """The same state in flatlm 0.2's layout (still loaded)."""
    parts = split(sd)
    return {
        "flatlm_method": parts.scalars.method,
        "base": parts.base,
        "method_state": parts.method_state,
        "skipped_steps": parts.scalars.skipped_steps,
        "steps_since_fresh_perturbation": parts.scalars.steps_since_fresh_perturbation,
    }


LAYOUTS = pytest.mark.parametrize("layout", [lambda sd: sd, _v0_2], ids=["torch", "v0_2"])


@LAYOUTS
def test_a_state_dict_from_a_model_of_other_shapes_is_refused_at_load(layout):
    _, opt_small, _, _ = _trained()
    model = make_mlp(d_hidden=9)  # same number of tensors, other shapes
    x, y = make_batch()
    opt = create("sam", model.parameters(), rho=0.2, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))
    before, state = params_of(model), state_tensors(opt)
    with pytest.raises(ValueError, match=r"has shape .* saved for another model"):
        opt.load_state_dict(layout(opt_small.state_dict()))
    assert_bitwise_equal(state_tensors(opt), state)
    opt.step(forward=lambda: model(x), loss_fn=ce(y))  # and it still works
    assert any(not torch.equal(a, b) for a, b in zip(params_of(model), before, strict=True))


@LAYOUTS
def test_a_state_dict_for_another_grouping_is_refused(layout):
    _, opt, _, _ = _trained()
    model = make_mlp()
    other = create(
        "sam",
        [{"params": [model.fc1.weight]}, {"params": [model.fc1.bias, *model.fc2.parameters()]}],
        rho=0.2,
        lr=0.01,
    )
    with pytest.raises(ValueError, match=r"groups of sizes \[4\].*\[1, 3\]"):
        other.load_state_dict(layout(opt.state_dict()))


def _set(mapping, key, value):
    mapping[key] = value


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda sd: sd.pop("param_groups"), "keys 'state' and 'param_groups'"),
        (lambda sd: sd.update(state=[1, 2]), "not a dict"),
        (lambda sd: sd["state"].update({99: {}}), "state for 99"),
        (lambda sd: sd["param_groups"][0].pop("params"), "bad 'param_groups'"),
        (lambda sd: sd["param_groups"][0].pop("flatlm_method"), "no 'flatlm_method'"),
        (
            lambda sd: sd["param_groups"][0].pop("flatlm_skipped_steps"),
            r"lacks \['flatlm_skipped_steps'\]",
        ),
        (lambda sd: _set(sd["param_groups"][0], "flatlm_method", "SAM"), "is for SAM"),
        (
            lambda sd: _set(sd["state"][0], "flatlm_grad_sq_ema", torch.zeros(3)),
            r"'flatlm_grad_sq_ema' of parameter 0 has shape \(3,\)",
        ),
    ],
)
def test_a_malformed_state_dict_is_a_clear_error(mangle, match):
    _, opt, _, _ = _trained("gasam")
    sd = opt.state_dict()
    mangle(sd)
    state = state_tensors(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_bitwise_equal(state_tensors(opt), state)
    assert not any(k.startswith("flatlm_") for g in opt.param_groups for k in g)


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda sd: sd["base"].pop("param_groups"), "lacks 'state'/'param_groups'"),
        (lambda sd: sd.update(method_state=[1, 2]), "not a dict"),
        (lambda sd: sd["base"]["state"].update({99: {}}), "state for 99"),
        (lambda sd: sd["method_state"].update({99: {}}), "method state for 99"),
        (lambda sd: sd["base"]["param_groups"][0].pop("params"), "bad 'param_groups'"),
        (lambda sd: sd.update(flatlm_method="FunctionalSAM"), "is for FunctionalSAM"),
        (
            lambda sd: _set(sd["method_state"][2], "grad_sq_ema", torch.zeros(2, 2)),
            r"method state 'grad_sq_ema' of parameter 2 has shape \(2, 2\)",
        ),
    ],
)
def test_a_malformed_state_dict_of_flatlm_0_2_is_a_clear_error(mangle, match):
    _, opt, _, _ = _trained("gasam")
    sd = _v0_2(opt.state_dict())
    mangle(sd)
    state = state_tensors(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_bitwise_equal(state_tensors(opt), state)


def test_an_optimizer_already_built_can_be_wrapped_with_its_state():
    x, y = make_batch()
    a, b = make_mlp(), make_mlp()
    adam_a = torch.optim.AdamW(a.parameters(), lr=0.01, weight_decay=0.1)
    adam_b = torch.optim.AdamW(b.parameters(), lr=0.01, weight_decay=0.1)
    for model, adam in ((a, adam_a), (b, adam_b)):  # some plain AdamW steps first
        for _ in range(2):
            adam.zero_grad()
            ce(y)(model(x)).backward()
            adam.step()
    wrapped = FunctionalSAM(None, adam_a, rho=0.2)
    assert wrapped.base_optimizer is adam_a and wrapped.param_groups is adam_a.param_groups
    fresh = FunctionalSAM(b.parameters(), torch.optim.AdamW, rho=0.2, lr=0.01, weight_decay=0.1)
    fresh.base_optimizer.load_state_dict(adam_b.state_dict())
    for _ in range(2):
        wrapped.step(forward=lambda: a(x), loss_fn=ce(y))
        fresh.step(forward=lambda: b(x), loss_fn=ce(y))
    assert_bitwise_equal(params_of(a), params_of(b))
    with pytest.raises(TypeError, match="already-built AdamW"):
        SAM(None, adam_a, lr=0.1)
    with pytest.raises(ValueError, match="params differ"):
        SAM(b.parameters(), adam_a)
    assert create("sam", None, base_optimizer=adam_a).base_optimizer is adam_a


def test_create_takes_a_model_and_groups_it_without_decay_for_biases_norms_embeddings():
    from flatlm.optim.registry import decay_groups

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.norm = nn.LayerNorm(6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight  # tied

    model = LM()
    opt = create("fsam", model, lr=0.01, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert [p for p in decay["params"]] == [model.mix.weight] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {
        id(model.emb.weight),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.mix.bias),
    }
    assert no_decay["weight_decay"] == 0.0
    assert decay_groups(model, 0.3)[0]["weight_decay"] == 0.3


def test_create_names_base_optimizer_and_the_options_for_an_unknown_keyword():
    """timm-style keywords (``momentum=``, ``base=``) are not passed on to AdamW's bare
    TypeError: the error names ``base_optimizer=`` and the method's own options."""
    model = make_mlp()
    with pytest.raises(TypeError, match=r"'momentum'.*sam's own options are adaptive, eta") as e:
        create("sam", model, lr=1e-2, momentum=0.9)
    assert "base_optimizer=torch.optim.SGD" in str(e.value) and "rho" in str(e.value)
    with pytest.raises(TypeError, match=r"pass base_optimizer=torch.optim.SGD \(not base=\)"):
        create("sam", model, lr=1e-2, base=torch.optim.SGD)
    with pytest.raises(TypeError, match=r"Did you mean 'rho'\?"):
        create("gasam", model, rhoo=0.1)
    with pytest.raises(TypeError, match=r"plain torch.optim.AdamW: 'momentum'"):
        create("adamw", model, momentum=0.9)
    # What the hints say to write works: the base optimizer's own options go with it.
    opt = create("sam", model, base_optimizer=torch.optim.SGD, lr=1e-2, momentum=0.9)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.9
