"""torch.compile with the sharpness-aware step: Inductor's own dropout gives both passes the same
masks (the RNG replay reaches it), nothing recompiles after the warm-up (Dynamo's counters),
flatlm.optim.compile.compile_model, and a smoke run of benchmarks/compile_step.py.

The model is tiny and compiled once for the module (Inductor on CPU, gcc): compiling is what
costs here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.optim import create
from flatlm.optim.batchnorm import update_stats_once
from flatlm.optim.compile import compile_counts, compile_model
from helpers.scripts import load_benchmark

pytestmark = pytest.mark.slow  # compiles with Inductor: about 10-40 s for the module on 2 cores


class DropNet(nn.Module):
    """linear → batch norm → tanh → dropout(0.5) → linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))


def ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, Y)


@pytest.fixture(scope="module")
def compiled() -> tuple[DropNet, DropNet]:
    """(an eager model, a copy compiled in place with Inductor), warmed up with one forward and
    backward so later tests count no first compilation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    eager = DropNet()
    model = compile_model(copy.deepcopy(eager))
    ce(model(X)).backward()
    model.zero_grad(set_to_none=True)
    yield eager, model
    torch.set_num_threads(threads)


def one_pass_grads(model: nn.Module, rng: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradient of one forward–backward from RNG state ``rng``, and the RNG state after it
    (batch-norm statistics restored, so the model is left as it was)."""
    buffers = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_b" in k
    }
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    ce(model(X)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    end = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(buffers, strict=False)
    return grads, end


def base_step_grads(model: nn.Module, method: str, rng: torch.Tensor, **kw) -> list[torch.Tensor]:
    """The gradient the base optimizer steps with, in a step at ρ = 0 from RNG state ``rng``:
    with the same masks in both passes it is the clean gradient itself. (ρ = 0 in every group
    would be a plain one-pass step: a group of one parameter that never has a gradient keeps
    ρ > 0, so both passes run, at ε = 0.)"""
    params = [p.detach().clone() for p in model.parameters()]
    buffers = copy.deepcopy(model.state_dict())
    idle = nn.Parameter(torch.zeros(1))
    groups = [{"params": list(model.parameters())}, {"params": [idle], "rho": 0.5}]
    opt = create(method, groups, rho=0.0, lr=0.1, **kw)
    seen: list[list[torch.Tensor]] = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()])
    )
    torch.set_rng_state(rng)
    opt.step(forward=lambda: model(X), loss_fn=ce)
    with torch.no_grad():
        for p, q in zip(model.parameters(), params, strict=True):
            p.copy_(q)
    model.load_state_dict(buffers)
    model.zero_grad(set_to_none=True)
    return seen[0]


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_both_passes_of_a_compiled_model_see_the_same_dropout_masks(compiled, method):
    eager, model = compiled
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    clean, end = one_pass_grads(model, rng)
    # at ρ = 0 the perturbed pass reruns the clean one: equal bit for bit only if the masks are
    got = base_step_grads(model, method, rng)
    for a, b in zip(got, clean, strict=True):
        assert torch.equal(a, b)
    # the generators end where the one pass left them (a SAM run draws what AdamW's would)
    assert torch.equal(torch.get_rng_state(), end)
    # without the replay the masks differ, so the test above can fail
    unreplayed = base_step_grads(model, method, rng, replay_rng=False)
    assert any(not torch.equal(a, b) for a, b in zip(unreplayed, clean, strict=True))
    # and the masks are Inductor's own, not eager PyTorch's
    eager_grads, _ = one_pass_grads(eager, rng)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(eager_grads, clean, strict=True))


def test_no_recompilation_after_the_warm_up(compiled):
    """Each kind of pass compiles once (the forward with gradients, fsam's no-grad clean forward
    under perturb_every, the frozen batch-norm variant); after that, steps of every method
    compile nothing (Dynamo's frame and graph counters, and error_on_recompile): neither the
    step policies' plain and reuse steps nor switching ρ between 0 (a plain step) and > 0."""
    _, model = compiled
    state = copy.deepcopy(model.state_dict())
    specs = [
        "sam",
        "fsam",
        "gasam",
        "fsam:perturb_every=2",
        "sam:perturb_every=2",
        "fsam:policy=looksam,every=2",
        "sam:policy=interval,every=2",
        "bsam:num_data=64",  # the noisy clean pass: θ + e, copied back, compiles nothing new
    ]
    opts = {name: create(name, model.parameters(), lr=1e-3) for name in specs}
    toggled = [create(name, model.parameters(), lr=1e-3) for name in ("fsam", "gasam", "msam")]

    def steps(n: int) -> None:
        for i in range(n):
            for opt in opts.values():
                opt.step(forward=lambda: model(X), loss_fn=ce)
            opts["sam"].step(forward=update_stats_once(model, lambda: model(X)), loss_fn=ce)
            for opt in toggled:  # ρ > 0, then ρ = 0 (plain), then ρ > 0 ...
                for g in opt.param_groups:
                    g["rho"] = 0.05 if i % 2 == 0 else 0.0
                opt.step(forward=lambda: model(X), loss_fn=ce)

    steps(2)  # warm-up: a reuse step of each perturb_every run, the frozen variant, ρ = 0
    warm = compile_counts()
    assert warm.graphs >= 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        steps(3)
    assert compile_counts() == warm
    assert toggled[0].step_counts == {"fresh": 3, "reuse": 0, "plain": 2}
    model.load_state_dict(state)


def test_compile_model_compiles_in_place():
    torch.manual_seed(0)
    model = DropNet()
    keys = list(model.state_dict())
    out = compile_model(model, backend="aot_eager")
    assert out is model and isinstance(model, DropNet) and list(model.state_dict()) == keys
    model(X)  # runs (aot_eager: no code generation)


def test_compile_model_without_a_cxx_compiler_says_so(monkeypatch):
    import flatlm.optim.compile as compile_module

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        compile_model(DropNet())


def test_benchmark_smoke_run(tmp_path):
    """benchmarks/compile_step.py end to end on the smallest model (aot_eager: the plumbing, not
    Inductor's timings), every row complete and nothing recompiled."""
    bench = load_benchmark("compile_step")
    rows = bench.main(
        [
            "--sizes",
            "micro",
            "--batch",
            "2",
            "--seq",
            "8",
            "--vocab",
            "32",
            "--warmup",
            "1",
            "--steps",
            "1",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--backend",
            "aot_eager",
            "--methods",
            "adamw",
            "fsam",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert [r["method"] for r in rows] == ["adamw", "fsam"]
    assert all(r["eager_ms"] > 0 and r["compiled_ms"] > 0 for r in rows)
    assert rows[0]["graphs"] >= 1 and all(r["recompiles_after_warmup"] == 0 for r in rows)
    assert all(r["param_rel_diff"] < 1e-3 for r in rows)
    assert (tmp_path / "c.json").is_file()
