"""flatlm.integrations.lightning: Lightning's manual optimization against the engine's own
``step(forward=, loss_fn=)`` on the same batches and random states; accumulation, clipping,
bf16 and fp16 precision plugins, checkpoint/resume, DDP (2 processes on CPU), the refusal of
automatic optimization, and docs/lightning.md's example."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

pytest.importorskip("pytorch_lightning")

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

import flatlm.optim
from flatlm.integrations.lightning import SharpnessAwareMixin, sharpness_aware_step
from helpers.optim import QUIET, OverflowHook

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["sam", "asam", "fsam", "psam", "pfsam", "gasam", "msam", "mfsam", "bsam:num_data=64"]
OPT = {"lr": 0.01, "weight_decay": 0.1, "rho": 0.2}

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


# --- the module, the data, the reference --------------------------------------------------------


class Net(nn.Module):
    """Two layers, a tanh and dropout: J depends on θ, and masks must be replayed."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_net(dtype=torch.float64, dropout: float = 0.0, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(dropout).to(dtype)


def dataset(
    n: int = 16, dtype=torch.float64, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x, y, strict=True))


class LitNet(SharpnessAwareMixin, pl.LightningModule):
    """What a user writes (docs/lightning.md), plus records of what each step saw.

    ``mode``: "single" (one batch per step), "chunks" (the batch split into 2 micro-batches),
    "accumulate" (``accumulate=2`` over consecutive batches)."""

    def __init__(
        self,
        net: Net,
        method: str = "sam",
        mode: str = "single",
        opt_kwargs: dict | None = None,
        data: list | None = None,
        batch_size: int = 4,
        scheduler: bool = False,
        position_seed: bool = False,
    ):
        super().__init__()
        self.net, self.method, self.mode = net, method, mode
        self.opt_kwargs = dict(OPT if opt_kwargs is None else opt_kwargs)
        self.data, self.batch_size = data, batch_size
        self.scheduler, self.position_seed = scheduler, position_seed
        self.seen: list = []  # (batch, RNG state before the step's first forward)
        self.losses: list = []

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = flatlm.optim.create(self.method, self, **self.opt_kwargs)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": sched}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)

    def on_train_batch_start(self, batch, batch_idx):
        # Dropout masks that depend on the position in training only: Lightning's checkpoints
        # do not hold the RNG state, and a DataLoader draws from it when an epoch starts.
        if self.position_seed:
            torch.manual_seed(1000 * self.current_epoch + batch_idx)

    def training_step(self, batch, batch_idx):
        torch.set_num_threads(1)
        self.seen.append(([t.clone() for t in batch], torch.get_rng_state()))
        ce = lambda logits, mb: F.cross_entropy(logits, mb[1])  # noqa: E731
        if self.mode == "single":
            x, y = batch
            loss = self.sharpness_aware_step(
                forward=lambda: self(x), loss_fn=lambda logits: F.cross_entropy(logits, y)
            )
        elif self.mode == "chunks":
            mbs = list(zip(*(t.chunk(2) for t in batch), strict=True))
            loss = self.sharpness_aware_step(
                forward=lambda mb: self(mb[0]), loss_fn=ce, micro_batches=mbs
            )
        else:
            loss = self.sharpness_aware_step(
                forward=lambda mb: self(mb[0]), loss_fn=ce, micro_batches=[batch], accumulate=2
            )
        if loss is not None:
            self.losses.append(float(loss))
            if self.scheduler:
                self.lr_schedulers().step()
        return loss


def engine_run(
    net: Net,
    method: str,
    steps: list[list],
    opt_kwargs: dict,
    rng_states=None,
    autocast=None,
    scaler=None,
):
    """The same steps through flatlm's own ``step``: each step a list of micro-batches."""
    opt = flatlm.optim.create(method, net, **opt_kwargs)
    for i, mbs in enumerate(steps):
        if rng_states is not None:
            torch.set_rng_state(rng_states[i])
        # cache_enabled=False, as Lightning's plugin: with autocast's weight-cast cache on
        # around the whole step, the perturbed pass would reuse θ's casts (measured: SAM's
        # perturbed gradient then equals the clean one).
        autocasting = (
            torch.autocast("cpu", dtype=autocast, cache_enabled=False) if autocast else None
        )
        with autocasting or _null():
            if len(mbs) == 1:
                x, y = mbs[0]
                opt.step(
                    forward=lambda: net(x),
                    loss_fn=lambda z: F.cross_entropy(z, y),
                    grad_scaler=scaler,
                )
            else:
                opt.step(
                    forward=lambda mb: net(mb[0]),
                    loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
                    micro_batches=mbs,
                    grad_scaler=scaler,
                )
    return net, opt


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def fit(module: LitNet, **trainer_kwargs) -> pl.Trainer:
    kwargs = {**QUIET, **trainer_kwargs}
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module)
    return trainer


def assert_same(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        if tol:
            torch.testing.assert_close(p, q, msg=name, **tol)
        else:
            assert torch.equal(p, q), (name, float((p - q).abs().max()))


class GradNorms(Callback):
    """The gradient norm the base optimizer steps with, seen from on_before_optimizer_step."""

    def __init__(self):
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))


# --- against the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_equals_the_engine_step(method):
    """3 steps with dropout, clipping and weight decay: Lightning's parameters are the engine's,
    bit for bit, from the same batches and RNG states; global_step counts the steps; the
    on_before_optimizer_step hook sees the clipped perturbed gradient."""
    kwargs = {**OPT, "max_grad_norm": 0.05}
    net = make_net(dropout=0.2)
    initial = copy.deepcopy(net)
    module = LitNet(net, method, opt_kwargs=kwargs, data=dataset(12))
    norms = GradNorms()
    trainer = fit(module, max_steps=3, callbacks=[norms])
    assert trainer.global_step == 3 and len(module.seen) == 3
    ref, _ = engine_run(
        initial,
        method,
        [[tuple(b)] for b, _ in module.seen],
        kwargs,
        rng_states=[r for _, r in module.seen],
    )
    assert_same(net, ref)
    assert norms.norms == pytest.approx([0.05] * 3, rel=1e-4)  # clip_grad_norm_: max/(‖g‖ + 1e-6)
    assert not any(
        torch.equal(p, q) for p, q in zip(net.parameters(), make_net().parameters(), strict=True)
    )


def hand_written_sam(net: Net, steps: list, rho: float, functional: bool) -> Net:
    """Each step written out with nothing from flatlm: the recorded RNG state, the clean
    forward/backward (g, and the logits' gradient r), θ + ρg/‖g‖, the same RNG state, the
    second forward/backward (∇L, or ``logits.backward(r)`` for Functional-SAM), θ restored, the
    gradient clipped to 0.05, a torch AdamW step (weight decay on the matrices only)."""
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": OPT["weight_decay"]}, {"params": rest}],
        lr=OPT["lr"],
        weight_decay=0.0,
    )
    params = decay + rest
    for (x, y), rng in steps:
        adamw.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        logits = net(x)
        logits.retain_grad()
        F.cross_entropy(logits, y).backward()
        r = logits.grad.detach()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
            clean = [p.detach().clone() for p in params]
            for p in params:
                p.add_(rho * p.grad / norm)
        adamw.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
        logits = net(x)
        if functional:
            logits.backward(r)
        else:
            F.cross_entropy(logits, y).backward()
        with torch.no_grad():
            for p, c in zip(params, clean, strict=True):
                p.copy_(c)
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        adamw.step()
    return net


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_sam_and_fsam_equal_a_hand_written_loop(method):
    """Lightning's path against a loop written here (the engine comparison above checks the
    rest against the engine, itself checked against hand-written references)."""
    net = make_net(dropout=0.2)
    initial = copy.deepcopy(net)
    module = LitNet(net, method, opt_kwargs={**OPT, "max_grad_norm": 0.05}, data=dataset(12))
    fit(module, max_steps=3)
    steps = [(tuple(b), rng) for b, rng in module.seen]
    ref = hand_written_sam(copy.deepcopy(initial), steps, OPT["rho"], method == "fsam")
    assert_same(net, ref, rtol=1e-10, atol=1e-12)
    adamw = hand_written_sam(copy.deepcopy(initial), steps, 0.0, False)
    moved = [(p - q).abs().max() for p, q in zip(ref.parameters(), adamw.parameters(), strict=True)]
    assert max(moved) > 1e-3  # ρ changed the run by far more than the tolerance


@pytest.mark.parametrize("method", ["sam", "fsam"])
@pytest.mark.parametrize("mode", ["chunks", "accumulate"])
def test_gradient_accumulation_equals_the_engine_with_micro_batches(method, mode):
    """``micro_batches`` within a batch, and ``accumulate=2`` across batches: 5 batches step at
    batches 2, 4 and 5 (the epoch's last), each over the batches held since the last step."""
    net = make_net()
    initial = copy.deepcopy(net)
    module = LitNet(net, method, mode=mode, data=dataset(20))
    trainer = fit(module, max_epochs=1)
    batches = [tuple(b) for b, _ in module.seen]
    assert len(batches) == 5
    if mode == "chunks":
        steps = [list(zip(*(t.chunk(2) for t in b), strict=True)) for b in batches]
    else:
        steps = [batches[0:2], batches[2:4], batches[4:5]]
    assert trainer.global_step == len(steps) == len(module.losses)
    ref, _ = engine_run(initial, method, steps, OPT)
    assert_same(net, ref)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_bf16_mixed_equals_the_engine_under_autocast(method):
    net = make_net(torch.float32)
    initial = copy.deepcopy(net)
    module = LitNet(net, method, data=dataset(12, torch.float32))
    fit(module, max_steps=3, precision="bf16-mixed")
    ref, _ = engine_run(
        initial, method, [[tuple(b)] for b, _ in module.seen], OPT, autocast=torch.bfloat16
    )
    assert_same(net, ref)
    assert all(math.isfinite(v) for v in module.losses)


def _fp16_plugin(scale: float) -> MixedPrecision:
    """What Lightning builds for precision='16-mixed' on a GPU; on CPU it refuses fp16, so the
    plugin is given by hand."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_fp16_grad_scaler_equals_the_engine_with_its_scaler(method):
    net = make_net(torch.float32)
    initial = copy.deepcopy(net)
    module = LitNet(net, method, data=dataset(12, torch.float32))
    plugin = _fp16_plugin(2.0**10)
    fit(module, max_steps=3, plugins=[plugin])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref, _ = engine_run(
        initial,
        method,
        [[tuple(b)] for b, _ in module.seen],
        OPT,
        autocast=torch.float16,
        scaler=scaler,
    )
    assert_same(net, ref)
    assert plugin.scaler.get_scale() == scaler.get_scale() == 2.0**10


def test_fp16_overflow_in_the_perturbed_pass_skips_the_step_and_backs_off():
    net = make_net(torch.float32)
    before = copy.deepcopy(net)
    overflow = OverflowHook({2})  # call 1: the clean pass, call 2: the perturbed one
    net.fc2.register_forward_hook(overflow)
    module = LitNet(net, "sam", data=dataset(4, torch.float32))
    plugin = _fp16_plugin(2.0**10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", flatlm.optim.NonFiniteStepWarning)  # routine: no warning
        trainer = fit(module, max_steps=1, plugins=[plugin])
    assert overflow.count == 2
    assert_same(net, before)
    assert plugin.scaler.get_scale() == 2.0**9
    assert trainer.optimizers[0].skipped_steps == 1
    assert trainer.global_step == 1  # Lightning counts a step the scaler skipped, as it does


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fsam", "gasam"])
def test_resume_from_lightning_checkpoint_continues_identically(tmp_path, method):
    """Two epochs straight, against one epoch, Lightning's checkpoint, and a resumed second
    epoch (dropout, an LR schedule, AdamW moments and GA-SAM's statistics in the checkpoint)."""

    def module() -> LitNet:
        return LitNet(
            make_net(dropout=0.2), method, data=dataset(16), scheduler=True, position_seed=True
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = module()
    fit(full, max_epochs=2)
    part = module()
    fit(part, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt])
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)
    osd = saved["optimizer_states"][0]
    assert osd["param_groups"][0]["flatlm_method"] and osd["state"] and saved["global_step"] == 4
    resumed = module()
    trainer = pl.Trainer(**QUIET, max_epochs=2)
    trainer.fit(resumed, ckpt_path=str(path))
    assert trainer.global_step == 8
    assert_same(resumed.net, full.net)
    assert resumed.losses == full.losses[4:]


# --- refusing automatic optimization ------------------------------------------------------------


class AutomaticNet(pl.LightningModule):
    """A flatlm optimizer under automatic optimization: what the issue saw go wrong."""

    def __init__(self, method: str = "sam"):
        super().__init__()
        self.net, self.method = make_net(), method

    def configure_optimizers(self):
        return flatlm.optim.create(self.method, self, **OPT)

    def train_dataloader(self):
        return DataLoader(dataset(8), batch_size=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def test_the_mixin_refuses_automatic_optimization():
    class Switched(LitNet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.automatic_optimization = True

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    module = Switched(make_net(), data=dataset(8))
    before = copy.deepcopy(module.net)
    with pytest.raises(RuntimeError, match=r"manual optimization.*docs/lightning.md"):
        fit(module, max_steps=2)
    assert_same(module.net, before)
    # and the helper itself, called under automatic optimization
    with pytest.raises(RuntimeError, match="automatic optimization"):
        sharpness_aware_step(module, forward=lambda: None, loss_fn=lambda z: z)


@pytest.mark.parametrize("plugins", [None, "fp16"])
def test_a_flatlm_optimizer_under_automatic_optimization_never_steps(plugins):
    """Without the mixin Lightning's step reaches the engine: it fails (never a wrong step)."""
    module = AutomaticNet()
    before = copy.deepcopy(module.net)
    extra = {"plugins": [_fp16_plugin(2.0**10)]} if plugins else {}
    with pytest.raises((RuntimeError, TypeError)):
        fit(module, max_steps=2, **extra)
    assert_same(module.net, before)


@pytest.mark.parametrize("plugins", [None, "fp16"])
def test_automatic_optimization_error_points_to_the_integration(plugins):
    extra = {"plugins": [_fp16_plugin(2.0**10)]} if plugins else {}
    with pytest.raises((RuntimeError, TypeError), match=r"docs/lightning\.md"):
        fit(AutomaticNet(), max_steps=2, **extra)


def test_the_mixin_after_lightning_module_is_refused_at_class_definition():
    with pytest.raises(TypeError, match=r"put SharpnessAwareMixin first in the bases, class Late"):

        class Late(pl.LightningModule, SharpnessAwareMixin):
            pass


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"gradient_clip_val": 0.5}, r"max_grad_norm=0\.5\) in configure_optimizers"),
        ({"accumulate_grad_batches": 2}, r"micro_batches=\[batch\] and accumulate=2"),
    ],
)
def test_trainer_settings_of_automatic_optimization_get_flatlm_advice(setting, match):
    """Lightning's own message says "switch to automatic optimization", which cannot run a
    sharpness-aware step: flatlm's counterpart is named instead, before anything runs."""
    module = LitNet(make_net(), data=dataset(8))
    before = copy.deepcopy(module.net)
    with pytest.raises(ValueError, match=match):
        fit(module, max_steps=1, **setting)
    assert_same(module.net, before)


def test_bad_arguments():
    module = LitNet(make_net(), data=dataset(8))
    module.training_step = lambda batch, batch_idx: module.sharpness_aware_step(
        forward=lambda: module(batch[0]), loss_fn=lambda z: z.sum(), accumulate=2
    )
    with pytest.raises(TypeError, match=r"micro_batches=\[batch\]"):
        fit(module, max_steps=1)
    module = LitNet(make_net(), data=dataset(8))
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters())
    module.training_step = lambda batch, batch_idx: module.sharpness_aware_step(
        forward=lambda: module(batch[0]), loss_fn=lambda z: z.sum()
    )
    with pytest.raises(TypeError, match="flatlm optimizer"):
        fit(module, max_steps=1)


def test_import_without_lightning_names_the_extra():
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
        "try:\n    import flatlm.integrations.lightning\nexcept ImportError as e:\n"
        "    assert \"pip install 'flatlm[lightning]'\" in str(e), e\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- DDP: two processes on CPU --------------------------------------------------------------------

WORLD = 2


class DDPNet(LitNet):
    """Each rank trains on its own half of every global batch and saves its parameters."""

    def __init__(self, method: str, mode: str, out: str):
        super().__init__(make_net(), method, mode=mode, data=None)
        self.out = out

    def train_dataloader(self):
        rank = self.global_rank
        rows = [row for i, row in enumerate(dataset(32)) if (i // 4) % WORLD == rank]
        return DataLoader(rows, batch_size=4, shuffle=False)

    def on_train_start(self):
        # count DDP's all-reduces (one bucket here): one per pass, whatever the micro-batches
        self.all_reduces = 0

        def counting(state, bucket):
            self.all_reduces += 1
            return default_hooks.allreduce_hook(None, bucket)

        self.trainer.strategy.model.register_comm_hook(None, counting)

    def on_train_end(self):
        params = [p.detach().clone() for p in self.net.parameters()]
        torch.save((params, self.all_reduces), f"{self.out}/rank{self.global_rank}.pt")


@pytest.mark.parametrize(
    ("method", "mode"), [("sam", "accumulate"), ("fsam", "single"), ("fsam", "accumulate")]
)
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, method, mode):
    """Lightning's DDP strategy (forked processes, gloo): every rank ends with the parameters of one
    process stepping on the concatenated global batches (ε from the all-reduced gradient, one
    all-reduce per pass; with accumulate=2 the first micro-batch under no_sync)."""
    module = DDPNet(method, mode, str(tmp_path))
    trainer = pl.Trainer(
        **{**QUIET, "devices": WORLD},
        strategy="ddp_fork",
        max_epochs=1,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    rows = dataset(32)
    global_batches = [rows[i : i + 2 * 4] for i in range(0, 32, 8)]  # 4 per rank, 2 ranks
    merged = [
        (torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b])) for b in global_batches
    ]
    # a global batch: rank 0's 4 rows, then rank 1's; DDP's mean of the two halves' gradients
    # is the gradient of the mean over all 8
    if mode == "accumulate":
        steps = [[merged[0], merged[1]], [merged[2], merged[3]]]
    else:
        steps = [[b] for b in merged]
    ref, _ = engine_run(make_net(), method, steps, OPT)
    for rank in range(WORLD):
        got, all_reduces = torch.load(tmp_path / f"rank{rank}.pt")
        assert all_reduces == 2 * len(steps)
        for p, q in zip(got, ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# --- docs/lightning.md --------------------------------------------------------------------------------


def python_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("lightning.md")
    assert blocks
    namespace: dict = {"__name__": "docs_lightning"}
    exec(compile(blocks[0], "docs/lightning.md", "exec"), namespace)
    trainer, model = namespace["trainer"], namespace["model"]
    assert trainer.global_step == 40  # 2 epochs of 20 batches, one step each
    model.eval()
    with torch.no_grad():
        accuracy = (model(namespace["x"]).argmax(1) == namespace["y"]).float().mean()
    assert accuracy > 0.6  # it learns (chance: 0.25; measured 0.84)


@pytest.mark.parametrize(
    "method", ["sam:policy=aesam,total_steps=4", "fsam:policy=looksam,every=2"]
)
def test_a_step_policy_runs_under_lightning_and_counts(method):
    """A policy in the method spec: Lightning's steps equal the engine's, bit for bit, and the
    optimizer counts each kind of step."""
    net = make_net(dropout=0.2)
    initial = copy.deepcopy(net)
    module = LitNet(net, method, data=dataset(16))
    trainer = fit(module, max_steps=4)
    ref, ref_opt = engine_run(
        initial, method, [[tuple(b)] for b, _ in module.seen], OPT, [r for _, r in module.seen]
    )
    assert_same(net, ref)
    counts = trainer.optimizers[0].step_counts
    assert counts == ref_opt.step_counts and sum(counts.values()) == 4
    if "looksam" in method:
        assert counts == {"fresh": 2, "reuse": 2, "plain": 0}
