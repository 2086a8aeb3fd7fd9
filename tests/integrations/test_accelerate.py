"""flatlm.integrations.accelerate: a raw Accelerate loop (prepared model, optimizer, dataloader
and scheduler; Accelerate's gradient accumulation; its GradScaler; bf16; save_state/load_state)
against the engine's own ``step(forward=, loss_fn=, micro_batches=)`` on the same batches, and
docs/accelerate.md's example."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

import flatlm.optim
from flatlm.integrations.accelerate import AcceleratedStep
from helpers.optim import OverflowHook

ROOT = Path(__file__).resolve().parents[2]
OPT = {"lr": 0.01, "weight_decay": 0.1, "rho": 0.2}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its settings in process-wide singletons: each test starts clean."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_net(dtype=torch.float64, dropout: float = 0.0) -> Net:
    torch.manual_seed(0)
    return Net(dropout).to(dtype)


def rows(n: int, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def forward_of(model):
    return lambda b: model(b["x"])


def loss_of(logits, b):
    return F.cross_entropy(logits, b["y"])


def run_loop(
    method,
    net,
    data,
    *,
    accumulation=2,
    scaler=None,
    mixed_precision="no",
    epochs=1,
    opt_kwargs=OPT,
    record_rng=False,
):
    """The documented loop. Returns (accelerator, the step helper, the batches of each update,
    the RNG state before each update's first forward, the prepared optimizer, scheduler)."""
    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision
    )
    if scaler is not None:  # what Accelerator(mixed_precision="fp16") makes on a GPU
        accelerator.scaler = scaler
    opt = flatlm.optim.create(method, net, **opt_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = DataLoader(data, batch_size=4, shuffle=False)
    model, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
    step = AcceleratedStep(accelerator, model, opt)
    updates, held, states = [], [], []
    for _ in range(epochs):
        for batch in loader:
            if not held:
                states.append(torch.get_rng_state())
            held.append({k: v.clone() for k, v in batch.items()})
            with accelerator.accumulate(model):
                loss = step(batch, forward=forward_of(model), loss_fn=loss_of)
            sched.step()
            if loss is not None:
                updates.append(held)
                held = []
    assert step.pending == 0 and not held
    return accelerator, step, updates, states, opt, sched


def engine_run(method, net, updates, *, scaler=None, forward=None, rng_states=None):
    opt = flatlm.optim.create(method, net, **OPT)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for i, mbs in enumerate(updates):
        if rng_states is not None:
            torch.set_rng_state(rng_states[i])
        opt.step(
            forward=forward or forward_of(net),
            loss_fn=loss_of,
            micro_batches=mbs,
            grad_scaler=scaler,
        )
        sched.step()
    return net, opt


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), (name, float((p - q).abs().max()))


@pytest.mark.parametrize("method", ["sam", "fsam", "psam", "gasam", "msam", "mpfsam"])
def test_accumulating_loop_equals_the_engine_with_micro_batches(method):
    """5 batches, gradient_accumulation_steps=2: updates over batches (1, 2), (3, 4) and (5),
    the last cut short by the end of the dataloader; with dropout, an LR schedule stepped by
    Accelerate's scheduler (which only advances on updates)."""
    net = make_net(dropout=0.2)
    initial = copy.deepcopy(net)
    _, _, updates, states, opt, _ = run_loop(method, net, rows(20))
    assert [len(u) for u in updates] == [2, 2, 1]
    ref, ref_opt = engine_run(method, initial, updates, rng_states=states)
    assert_same(net, ref)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def hand_written_sam(net: Net, updates: list, rng_states: list, rho: float) -> Net:
    """Each update written out with nothing from flatlm: per micro-batch (its RNG state kept)
    the clean forward/backward of loss/M, θ + ρg/‖g‖, each micro-batch again at θ + ε from its
    own RNG state, θ restored, a torch AdamW step at lr 0.01/(1 + update index), weight decay on
    the matrices only."""
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": rest}],
        lr=OPT["lr"],
        weight_decay=0.0,
    )
    params = decay + rest
    for i, (mbs, state) in enumerate(zip(updates, rng_states, strict=True)):
        adamw.zero_grad(set_to_none=True)
        torch.set_rng_state(state)
        states = []
        for b in mbs:
            states.append(torch.get_rng_state())
            (loss_of(net(b["x"]), b) / len(mbs)).backward()
        after_clean = torch.get_rng_state()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
            clean = [p.detach().clone() for p in params]
            for p in params:
                p.add_(rho * p.grad / norm)
        adamw.zero_grad(set_to_none=True)
        for b, mb_state in zip(mbs, states, strict=True):
            torch.set_rng_state(mb_state)
            (loss_of(net(b["x"]), b) / len(mbs)).backward()
        torch.set_rng_state(after_clean)
        with torch.no_grad():
            for p, c in zip(params, clean, strict=True):
                p.copy_(c)
        for group in adamw.param_groups:
            group["lr"] = OPT["lr"] / (1 + i)
        adamw.step()
    return net


def test_sam_equals_a_hand_written_loop():
    """The accumulating loop against a loop written here (the comparisons with the engine check
    the other methods and options; the engine is itself checked against hand-written ones)."""
    net = make_net(dropout=0.2)
    initial = copy.deepcopy(net)
    _, _, updates, states, _, _ = run_loop("sam", net, rows(20))
    ref = hand_written_sam(copy.deepcopy(initial), updates, states, OPT["rho"])
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    adamw = hand_written_sam(copy.deepcopy(initial), updates, states, 0.0)
    moved = [(p - q).abs().max() for p, q in zip(ref.parameters(), adamw.parameters(), strict=True)]
    assert max(moved) > 1e-3  # ρ changed the run by far more than the tolerance


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_grad_scaler_equals_the_engine_with_its_scaler(method):
    net = make_net(torch.float32)
    initial = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    *_, updates, _, opt, _ = run_loop(method, net, rows(16, torch.float32), scaler=scaler)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref, _ = engine_run(method, initial, updates, scaler=ref_scaler)
    assert_same(net, ref)
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**10
    assert not opt.step_was_skipped


def test_grad_scaler_overflow_skips_the_update_and_the_scheduler():
    net = make_net(torch.float32)
    before = copy.deepcopy(net)
    overflow = OverflowHook({3})  # update 1: clean passes 1-2, perturbed 3-4
    net.fc2.register_forward_hook(overflow)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", flatlm.optim.NonFiniteStepWarning)  # fp16: routine
        _, step, updates, _, opt, sched = run_loop(
            "sam", net, rows(8, torch.float32), scaler=scaler
        )
    assert len(updates) == 1 and overflow.count == 4
    assert_same(net, before)
    assert scaler.get_scale() == 2.0**9
    assert step.sam.skipped_steps == 1 and opt.step_was_skipped
    assert sched.scheduler.last_epoch == 0  # the prepared scheduler did not advance


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_bf16_mixed_precision_equals_the_engine_with_autocast_per_forward(method):
    """Accelerate autocasts each forward of the prepared model and returns float32 copies of
    the logits: the engine with the same forward gives the same parameters."""
    net = make_net(torch.float32)
    initial = copy.deepcopy(net)
    *_, updates, _, _, _ = run_loop(method, net, rows(16, torch.float32), mixed_precision="bf16")

    def forward(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return initial(b["x"]).float()

    ref, _ = engine_run(method, initial, updates, forward=forward)
    assert_same(net, ref)


@pytest.mark.parametrize("method", ["fsam", "gasam"])
def test_save_state_and_load_state_continue_identically(tmp_path, method):
    """Two epochs straight against one epoch, ``save_state``, a fresh Accelerator and
    ``load_state``, a second epoch (dropout: load_state restores the RNG states)."""
    data = rows(16)

    def build():
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        net = make_net(dropout=0.2)
        opt = flatlm.optim.create(method, net, **OPT)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        loader = DataLoader(data, batch_size=4, shuffle=False)
        model, opt, loader, sched = accelerator.prepare(net, opt, loader, sched)
        return accelerator, net, model, opt, loader, sched, AcceleratedStep(accelerator, model, opt)

    def epoch(accelerator, model, loader, sched, step):
        for batch in loader:
            with accelerator.accumulate(model):
                step(batch, forward=forward_of(model), loss_fn=loss_of)
            sched.step()

    accelerator, full, model, _, loader, sched, step = build()
    epoch(accelerator, model, loader, sched, step)
    accelerator.save_state(str(tmp_path / "ckpt"))
    epoch(accelerator, model, loader, sched, step)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator, resumed, model, opt, loader, sched, step = build()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert opt.state_dict()["param_groups"][0]["flatlm_method"] and opt.state_dict()["state"]
    epoch(accelerator, model, loader, sched, step)
    assert_same(resumed, full)


def test_refuses_an_optimizer_that_is_not_flatlm():
    accelerator = Accelerator(cpu=True)
    net = make_net()
    model, opt = accelerator.prepare(net, torch.optim.AdamW(net.parameters()))
    with pytest.raises(TypeError, match="flatlm optimizer"):
        AcceleratedStep(accelerator, model, opt)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "accelerate.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    namespace: dict = {"__name__": "docs_accelerate"}
    exec(compile(blocks[0], "docs/accelerate.md", "exec"), namespace)
    assert namespace["updates"] == 40  # 2 epochs of 40 batches, accumulated by 2
    model = namespace["model"]
    model.eval()
    with torch.no_grad():
        accuracy = (model(namespace["x"]).argmax(1) == namespace["y"]).float().mean()
    assert accuracy > 0.6  # it learns (chance: 0.25)
