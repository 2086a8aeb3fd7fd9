"""flatlm.integrations.hf: the Trainer path against the engine and against a hand-written
two-pass loop, clipping, AMP, checkpoints.

Tiny randomly initialised GPT-2 and BERT models on synthetic data; nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import flatlm.optim
from flatlm.integrations.hf import SharpnessAwareStep, SharpnessAwareTrainer
from helpers.hf_models import VOCAB, lm_data, tiny_gpt2
from helpers.optim import OverflowHook

transformers.logging.set_verbosity_error()

SAM_METHODS = ["sam", "fsam", "psam", "pfsam", "gasam"]


# --- models, data, arguments ------------------------------------------------------------------


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def cls_data(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Label 1 iff the second token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": torch.tensor(int(ids[1] >= VOCAB // 2))})
    return rows


def make_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "lr_scheduler_type": "constant",
        "max_steps": 2,
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Recording(SharpnessAwareTrainer):
    """Keeps a copy of every micro-batch the Trainer hands to training_step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def trainer_normaliser(trainer: Trainer, micro_batches: list[dict]) -> float:
    """The token count the Trainer divides each micro-batch's summed loss by.

    Recent transformers normalise by ``num_items_in_batch`` over the whole update; which labels
    it counts is its own choice (transformers 5.23 counts GPT-2's unshifted labels), so ask it.
    """
    count = getattr(trainer, "_get_num_items_in_batch", None)
    n = count(micro_batches, torch.device("cpu")) if count is not None else None
    if n is None:
        n = sum(int(mb["labels"][:, 1:].ne(-100).sum()) for mb in micro_batches)
    return float(n)


def causal_lm_loss(logits: torch.Tensor, mb: dict, normaliser: float, m: int) -> torch.Tensor:
    """The Trainer's loss of one micro-batch, times m (the engine weights each by 1/m)."""
    logits, labels = logits[:, :-1].flatten(0, 1), mb["labels"][:, 1:].flatten()
    return m * F.cross_entropy(logits, labels, reduction="sum") / normaliser


def reference_run(
    method: str, model: torch.nn.Module, updates: list[list[dict]], trainer: Trainer, **kwargs
) -> tuple[torch.nn.Module, list[float]]:
    """The same updates through flatlm's own step(forward=, loss_fn=, micro_batches=)."""
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    opt = flatlm.optim.create(method, groups, **{"fused": True, **kwargs})  # fused=None: not
    norms: list[float] = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, a, k: norms.append(float(global_norm(grads_of(o))))
    )
    model.train()
    for micro_batches in updates:
        n, m = trainer_normaliser(trainer, micro_batches), len(micro_batches)
        opt.step(
            forward=lambda mb: model(input_ids=mb["input_ids"]).logits,
            loss_fn=lambda logits, mb: causal_lm_loss(logits, mb, n, m),
            micro_batches=micro_batches,
        )
    return model, norms


def hand_written_run(
    method: str,
    model: torch.nn.Module,
    updates: list[list[dict]],
    trainer: Trainer,
    loss_of,
    rho: float,
    norms: dict[str, list[float]] | None = None,
) -> torch.nn.Module:
    """Each update written out by hand, with nothing from flatlm: the clean forward/backward of
    every micro-batch, ε from the accumulated gradient g, θ + ε, the second forward/backward
    (∇L, or for fsam/pfsam ``logits.backward(r)`` with the clean pass's dlogits r), θ restored,
    the gradient clipped to the Trainer's max_grad_norm, a torch AdamW step.

    ε = ρ u/‖n‖ with (u, n) = (g, g) for sam/fsam; (T²g, Tg), T = |θ| + 0.01 on tensors of
    two or more dimensions and 1 on the others, for asam; (P⁻¹g, P⁻¹g) for psam/pfsam, with
    P = √(v'/(1 − β₂ᵗ⁺¹)) + eps and v' = β₂v + (1 − β₂)g² from this AdamW's state (v = 0, t = 0
    before it has any); (D²g, D²g) for gasam with its defaults, D = clip((s/RMS(s) + 1e-12)^α,
    1/100, 100), α = 1, s = √(EMA₀.₉₉(g²)/(1 − 0.99ᵗ)).
    ``loss_of(logits, mb, micro_batches)`` is the Trainer's loss of one micro-batch.
    ``norms``, if given, receives per update ‖g‖ (``clean``), ‖ε‖ (``perturbation``) and the
    perturbed gradient's norm before clipping (``perturbed``): what the Trainer's logs report.
    """
    args = trainer.args
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    params = [p for group in groups for p in group["params"]]
    functional = method in ("fsam", "pfsam")
    ema, t = [torch.zeros_like(p) for p in params], 0
    model.train()
    for micro_batches in updates:
        for p in params:
            p.grad = None
        dlogits = []
        for mb in micro_batches:  # the clean pass
            logits = model(input_ids=mb["input_ids"]).logits
            logits.retain_grad()
            loss_of(logits, mb, micro_batches).backward()
            dlogits.append(logits.grad.detach())
        g = [p.grad.detach().clone() for p in params]
        with torch.no_grad():
            if method in ("sam", "fsam"):
                u = n = g
            elif method == "asam":
                scale = [p.abs() + 0.01 if p.dim() >= 2 else torch.ones_like(p) for p in params]
                n = [ti * gi for ti, gi in zip(scale, g, strict=True)]
                u = [ti * ni for ti, ni in zip(scale, n, strict=True)]
            elif method in ("psam", "pfsam"):
                beta2, precond = args.adam_beta2, []
                for p, gi in zip(params, g, strict=True):
                    st = adamw.state.get(p, {})
                    v = st.get("exp_avg_sq", torch.zeros_like(p))
                    step = float(st["step"]) if "step" in st else 0.0
                    v_hat = (beta2 * v + (1 - beta2) * gi * gi) / (1 - beta2 ** (step + 1))
                    precond.append(torch.sqrt(v_hat) + args.adam_epsilon)
                u = n = [gi / pi for gi, pi in zip(g, precond, strict=True)]
            else:  # gasam
                assert method == "gasam"
                t += 1
                ema = [0.99 * e + 0.01 * gi * gi for e, gi in zip(ema, g, strict=True)]
                s = [torch.sqrt(e / (1 - 0.99**t)) for e in ema]
                rms = torch.sqrt(sum((x * x).sum() for x in s) / sum(x.numel() for x in s))
                d = [((x / rms + 1e-12) ** 1.0).clamp(0.01, 100.0) for x in s]
                u = n = [di * di * gi for di, gi in zip(d, g, strict=True)]
            norm = torch.sqrt(sum((ni * ni).sum() for ni in n))
            clean = [p.detach().clone() for p in params]
            for p, ui in zip(params, u, strict=True):
                p.add_(rho * ui / norm)
            if norms is not None:
                norms["clean"].append(float(global_norm(g)))
                norms["perturbation"].append(float(rho * global_norm(u) / norm))
        for p in params:
            p.grad = None
        for mb, r in zip(micro_batches, dlogits, strict=True):  # the second pass, at θ + ε
            logits = model(input_ids=mb["input_ids"]).logits
            if functional:
                logits.backward(r)
            else:
                loss_of(logits, mb, micro_batches).backward()
        with torch.no_grad():
            for p, c in zip(params, clean, strict=True):
                p.copy_(c)
        if norms is not None:
            norms["perturbed"].append(float(global_norm([p.grad for p in params])))
        torch.nn.utils.clip_grad_norm_(params, args_max_grad_norm(trainer))
        adamw.step()
    return model


def args_max_grad_norm(trainer) -> float:
    """The clipping norm the Trainer was given (flatlm moves it off ``trainer.args``)."""
    norm = trainer.sam_max_grad_norm or trainer.args.max_grad_norm
    return norm if norm else math.inf


def float64_loss(task: str):
    """The Trainer's loss (``compute_loss_func``) for the float64 comparisons: summed over the
    targets, divided by the update's ``num_items_in_batch``, in float64. (Hugging Face's own
    causal-LM loss computes in float32 even for a float64 model; with GA-SAM's α = −1 that
    rounding of the clean gradient alone moved the parameters by 1e-5 in 3 steps, measured, so
    it would hide the comparison.)"""

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        if task == "gpt2":
            logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        return F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch

    return loss


def hand_loss_of(task: str, trainer: Trainer):
    """The same loss for the hand-written loop, with the Trainer's token count."""

    def loss_of(logits, mb, micro_batches):
        labels = mb["labels"]
        if task == "gpt2":
            logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        normaliser = trainer_normaliser(trainer, micro_batches)
        return F.cross_entropy(logits, labels, reduction="sum") / normaliser

    return loss_of


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def grads_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖·‖ of a list of tensors seen as one vector."""
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


class BaseStepGrads(TrainerCallback):
    """Records the gradient the base AdamW steps with (and its norm), at each of its steps."""

    def __init__(self, trainer: SharpnessAwareTrainer):
        self.trainer = trainer
        self.grads: list[list[torch.Tensor]] = []
        self.norms: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sam_optimizer.base_optimizer.register_step_pre_hook(self._record)

    def _record(self, opt, args, kwargs) -> None:
        grads = grads_of(opt)
        self.grads.append([g.detach().clone() for g in grads])
        self.norms.append(float(global_norm(grads)))


# --- import hygiene -----------------------------------------------------------------------------


def test_import_flatlm_does_not_import_transformers():
    code = (
        "import sys, flatlm, flatlm.integrations, flatlm.optim; "
        "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_gives_install_hint():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import flatlm.integrations.hf\nexcept ImportError as e:\n"
        "    assert 'pip install' in str(e) and 'flatlm[hf]' in str(e), e\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the numbers --------------------------------------------------------------------------------


# --- a Hugging Face model in the core API (no Trainer) ---------------------------------------


def _gpt2_steps(method: str, forward, loss_fn, steps: int = 2) -> list[torch.Tensor]:
    model = tiny_gpt2()
    x = torch.stack([row["input_ids"] for row in lm_data(4)])
    opt = flatlm.optim.create(method, model, lr=1e-2)
    for _ in range(steps):
        opt.step(forward=lambda: forward(model, x), loss_fn=lambda out: loss_fn(out, x))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_core_step_takes_a_model_output_and_its_loss(method):
    """``forward=lambda: m(x, labels=x), loss_fn=lambda o: o.loss`` (the ModelOutput and the
    model's own loss) takes the same steps as the logits and a hand-written shifted
    cross-entropy, for a plain and a functional method (r through ``o.logits``)."""
    ours = _gpt2_steps(method, lambda m, x: m(x, labels=x), lambda o, x: o.loss)

    def shifted_ce(logits, x):
        return F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    ref = _gpt2_steps(method, lambda m, x: m(x).logits, shifted_ce)
    init = [p.detach() for p in tiny_gpt2().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ours, init, strict=True))  # it moved
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # loss_fn may also read the logits off the output
    via_logits = _gpt2_steps(method, lambda m, x: m(x), lambda o, x: shifted_ce(o.logits, x))
    for a, b in zip(via_logits, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_model_output_gets_errors_that_say_what_to_write():
    # a one-pass functional method differentiates a detached copy of the logits: no .loss there
    with pytest.raises(ValueError, match=r"compute the loss from o\.logits"):
        _gpt2_steps("mfsam", lambda m, x: m(x, labels=x), lambda o, x: o.loss, steps=1)
    ce = lambda o, x: F.cross_entropy(o.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())  # noqa: E731
    _gpt2_steps("mfsam", lambda m, x: m(x, labels=x), ce, steps=2)  # what the error says works
    with pytest.raises(ValueError, match=r"only when called with labels="):  # no labels: no loss
        _gpt2_steps("sam", lambda m, x: m(x), lambda o, x: o.loss, steps=1)
    with pytest.raises(AttributeError) as e:  # a loss_fn written for the logits tensor
        _gpt2_steps("sam", lambda m, x: m(x), lambda logits, x: logits.flatten(0, 1), steps=1)
    assert "loss_fn receives it whole, not the logits tensor; read o.logits" in str(
        e.value.__notes__
    )
    with pytest.raises(TypeError, match=r"a Hugging Face ModelOutput"):  # return_dict=False
        _gpt2_steps("sam", lambda m, x: m(x, return_dict=False), lambda o, x: o, steps=1)


def test_trainer_runs_bsam_as_the_engine_step(tmp_path):
    """bSAM: the Trainer's clean passes at the noisy point θ + e (one draw per update, from
    add_noise in training_step), first_step copies θ back, the replay at θ + ε: equal to the
    engine's own step(forward=, micro_batches=) on the same micro-batches."""
    spec, rho, max_grad_norm = "bsam:num_data=64", 0.1, 0.05
    model = tiny_gpt2()
    initial = copy.deepcopy(model)
    start = params_of(initial)
    trainer = Recording(
        model=model,
        args=make_args(tmp_path, max_grad_norm=max_grad_norm, learning_rate=1.0),  # bSAM's α
        train_dataset=lm_data(8),
        sam_method=spec,
        sam_rho=rho,
    )
    trainer.train()
    assert trainer.sam_optimizer.param_groups[0]["noise_draws"] == 2
    assert trainer.sam_optimizer.step_counts["fresh"] == 2
    updates = [trainer.seen[0:2], trainer.seen[2:4]]
    reference, _ = reference_run(
        spec,
        initial,
        updates,
        trainer,
        fused=None,
        lr=1.0,
        weight_decay=0.1,
        betas=(0.9, 0.999),
        rho=rho,
        max_grad_norm=max_grad_norm,
    )
    got, want = params_of(model), params_of(reference)
    moved = max(float((got[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-4
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", [*SAM_METHODS, "wsam", "gsam", "friendlysam", "gcsam"])
def test_trainer_equals_engine_step_with_accumulation_and_clipping(tmp_path, method):
    """Two updates of two micro-batches each: the Trainer path is flatlm's own step, and the
    gradient AdamW receives (the perturbed one) is clipped to max_grad_norm."""
    max_grad_norm, rho = 0.05, 0.1
    model = tiny_gpt2()
    initial = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=make_args(tmp_path, max_grad_norm=max_grad_norm),
        train_dataset=lm_data(8),
        sam_method=method,
        sam_rho=rho,
    )
    base_norms = BaseStepGrads(trainer)
    trainer.add_callback(base_norms)
    trainer.train()

    assert isinstance(trainer.optimizer.optimizer, SharpnessAwareStep)
    assert len(trainer.seen) == 4
    assert not torch.equal(trainer.seen[0]["input_ids"], trainer.seen[1]["input_ids"])
    updates = [trainer.seen[0:2], trainer.seen[2:4]]
    reference, ref_norms = reference_run(
        method,
        initial,
        updates,
        trainer,
        lr=1e-2,
        weight_decay=0.1,
        betas=(0.9, 0.999),
        eps=1e-8,
        rho=rho,
        max_grad_norm=max_grad_norm,
    )
    got, want = params_of(model), params_of(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)

    # Clipping acted on the perturbed gradient; the Trainer did not clip the clean one.
    assert len(base_norms.norms) == 2
    for norm, ref in zip(base_norms.norms, ref_norms, strict=True):
        assert norm == pytest.approx(max_grad_norm, rel=1e-4)
        assert ref == pytest.approx(max_grad_norm, rel=1e-4)
    assert float(trainer._sam_grad_norm) > max_grad_norm  # the pre-clip norm, logged
    assert trainer.args.max_grad_norm == 0.0 and trainer.sam_max_grad_norm == max_grad_norm
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("grad_norm" in entry for entry in logged)
    # Every method here has ‖ε‖ = ρ (a unit direction, Euclidean radius): the logged norm says so.
    assert all(entry["perturbation_norm"] == pytest.approx(rho, rel=1e-5) for entry in logged)
    assert all(entry["skipped_steps"] == 0 for entry in logged)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, method):
    """2 micro-batches of 2 give AdamW the same gradient as 1 batch of 4."""
    grads = []
    for batch, accumulation in [(2, 2), (4, 1)]:
        trainer = SharpnessAwareTrainer(
            model=tiny_gpt2(),
            args=make_args(
                tmp_path / f"b{batch}",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
            ),
            train_dataset=lm_data(4),
            sam_method=method,
        )
        recorder = BaseStepGrads(trainer)
        trainer.add_callback(recorder)
        trainer.train()
        grads.append(recorder.grads[0])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- each method against a hand-written loop, and against AdamW -----------------------------------

# float64 throughout (model and loss): the Trainer path and the hand-written loop then agree to
# 2e-13 (measured, every method), while Adam's sign-like steps turn float32 rounding of
# gradients that are analytically zero (GPT-2's key biases) into 1e-5 differences.
LOOP_TOL = {"rtol": 1e-10, "atol": 1e-12}


def method_run(task: str, method: str, out) -> tuple[dict, dict | None, list[dict], dict]:
    """The Trainer's parameters, the hand-written loop's, the Trainer's training logs and the
    loop's norms (``hand_written_run``), after 3 updates of 2 micro-batches."""
    model = (tiny_gpt2() if task == "gpt2" else tiny_bert()).double()
    data = lm_data(12) if task == "gpt2" else cls_data(12)
    initial = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=make_args(out, max_steps=3),
        train_dataset=data,
        sam_method=method,
        compute_loss_func=float64_loss(task),
        **({} if method == "adamw" else {"sam_rho": 0.2}),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if method == "adamw":
        return params_of(model), None, logs, {}
    updates = [trainer.seen[i : i + 2] for i in range(0, len(trainer.seen), 2)]
    assert len(updates) == 3
    norms: dict[str, list[float]] = {"clean": [], "perturbation": [], "perturbed": []}
    reference = hand_written_run(
        method, initial, updates, trainer, hand_loss_of(task, trainer), rho=0.2, norms=norms
    )
    return params_of(model), params_of(reference), logs, norms


@pytest.fixture(scope="module")
def adamw_params(tmp_path_factory):
    """The plain Trainer's (sam_method='adamw') parameters after the same run, once per task."""
    cache: dict[str, dict] = {}

    def get(task: str) -> dict[str, torch.Tensor]:
        if task not in cache:
            cache[task] = method_run(task, "adamw", tmp_path_factory.mktemp(task))[0]
        return cache[task]

    return get


@pytest.mark.parametrize(
    ("task", "method"),
    [*(("gpt2", m) for m in [*SAM_METHODS, "asam"]), ("bert", "sam"), ("bert", "fsam")],
)
def test_trainer_equals_the_hand_written_two_pass_loop(tmp_path, adamw_params, task, method):
    """GPT-2 and BERT sequence classification, accumulation over 2 micro-batches, clipping at
    the default max_grad_norm = 1: the Trainer's parameters equal the hand-written loop's, and
    are far from plain AdamW's (the method changed the update by much more than the tolerance).
    """
    got, want, logs, norms = method_run(task, method, tmp_path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **LOOP_TOL, msg=name)
    # Every extra field of the training logs (logging_steps=1: one entry per update) against the
    # loop's own norms: ‖g‖ of the clean pass (clean_grad_norm, what the Trainer reported), the
    # perturbed gradient's before clipping (grad_norm), ‖ε‖ (perturbation_norm: ρ‖T²g‖/‖Tg‖ for
    # asam, ρ for the others) and no skipped step.
    assert len(logs) == 3
    for key, field in [
        ("clean", "clean_grad_norm"),
        ("perturbed", "grad_norm"),
        ("perturbation", "perturbation_norm"),
    ]:
        assert [e[field] for e in logs] == pytest.approx(norms[key], rel=1e-9), field
    assert norms["clean"] != pytest.approx(norms["perturbed"], rel=1e-3)  # the fields differ
    assert [e["skipped_steps"] for e in logs] == [0, 0, 0]
    # and not AdamW's: measured 0.06 away for every case here (≤ 2e-13 from the loop)
    assert max_abs_diff(got, adamw_params(task)) > 1e-4


def test_the_hand_written_loop_without_perturbation_is_the_plain_trainer(tmp_path, adamw_params):
    """The loop's loss, groups, clipping and AdamW are the Trainer's own: at ρ = 0 it reproduces
    sam_method='adamw', so the comparisons above test the perturbation and nothing else."""
    trainer = Recording(
        model=tiny_gpt2().double(),
        args=make_args(tmp_path, max_steps=3),
        train_dataset=lm_data(12),
        sam_method="adamw",
        compute_loss_func=float64_loss("gpt2"),
    )  # the plain Trainer again, to record its micro-batches and settings
    trainer.train()
    updates = [trainer.seen[i : i + 2] for i in range(0, len(trainer.seen), 2)]
    loss_of = hand_loss_of("gpt2", trainer)
    reference = hand_written_run("sam", tiny_gpt2().double(), updates, trainer, loss_of, rho=0.0)
    plain, want = adamw_params("gpt2"), params_of(reference)
    for name in want:
        torch.testing.assert_close(plain[name], want[name], **LOOP_TOL, msg=name)


# --- checkpoints ----------------------------------------------------------------------------------


class _StopAt(TrainerCallback):
    """Stops training after global step ``step`` (its checkpoint saved), as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


class RngAroundTheUpdate(TrainerCallback):
    """The CPU generator's state after an update's clean passes (``on_pre_optimizer_step``) and
    after the sharpness-aware update (``on_optimizer_step``). With ``theta_dependent``, every
    forward also draws 1 random number at the update's clean θ and 3 anywhere else, as a model
    whose randomness depends on the weights' values would (rejection sampling, value-dependent
    routing); ordinary dropout draws a fixed count per forward."""

    def __init__(self, model: torch.nn.Module, theta_dependent: bool):
        self.first = next(model.parameters())
        self.clean: torch.Tensor | None = None
        self.after_clean: list[torch.Tensor] = []
        self.after_update: list[torch.Tensor] = []
        if theta_dependent:
            model.register_forward_pre_hook(self._draw)

    def _draw(self, module, args) -> None:
        torch.rand(1 if torch.equal(self.first, self.clean) else 3)

    def on_step_begin(self, args, state, control, **kwargs):
        self.clean = self.first.detach().clone()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.after_clean.append(torch.get_rng_state())

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after_update.append(torch.get_rng_state())


@pytest.mark.parametrize("theta_dependent", [False, True], ids=["dropout", "theta-dependent"])
def test_the_generators_end_where_the_clean_passes_left_them(tmp_path, theta_dependent):
    """The update leaves the CPU generator where the clean passes did, so a SAM run consumes
    the random numbers an AdamW run would. Replaying each micro-batch's state before its second
    pass already ensures this when a forward's draws do not depend on θ (dropout: the first
    case, which passes without the final restore in _sharpness_aware_update); the restore is
    what keeps it for a model whose draws do (the second case fails without it)."""
    model = tiny_gpt2(dropout=0.1)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=lm_data(8),
        sam_method="sam",
    )
    rng = RngAroundTheUpdate(model, theta_dependent)
    trainer.add_callback(rng)
    trainer.train()
    assert len(rng.after_clean) == len(rng.after_update) == 2
    for clean, update in zip(rng.after_clean, rng.after_update, strict=True):
        assert torch.equal(clean, update)


@pytest.mark.parametrize(("method", "dropout"), [("sam", 0.0), ("fsam", 0.0), ("gasam", 0.1)])
def test_resume_from_checkpoint_continues_identically(tmp_path, method, dropout):
    def run(out: str, resume: str | None = None, stop: int | None = None) -> torch.nn.Module:
        model = tiny_gpt2(dropout=dropout)
        trainer = SharpnessAwareTrainer(
            model=model,
            args=make_args(
                out, max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear"
            ),
            train_dataset=lm_data(16),
            sam_method=method,
            sam_rho=0.1,
            callbacks=[_StopAt(stop)] if stop else None,
        )
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == (stop or 4)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=2)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    got, want = params_of(resumed), params_of(full)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    saved = torch.load(tmp_path / "part" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["param_groups"][0]["flatlm_method"] and saved["state"]


# --- switching by name ------------------------------------------------------------------------------


def test_adamw_is_the_plain_trainer(tmp_path):
    args = make_args(tmp_path, max_steps=3, max_grad_norm=0.05)
    plain_model, ours_model = tiny_gpt2(dropout=0.1), tiny_gpt2(dropout=0.1)
    Trainer(model=plain_model, args=args, train_dataset=lm_data(16)).train()
    ours = SharpnessAwareTrainer(
        model=ours_model, args=args, train_dataset=lm_data(16), sam_method="adamw"
    )
    ours.train()
    assert not isinstance(getattr(ours.optimizer, "optimizer", ours.optimizer), SharpnessAwareStep)
    assert ours.sam_optimizer is None and ours.args.max_grad_norm == 0.05
    for (name, p), q in zip(plain_model.named_parameters(), ours_model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_arguments_are_checked_and_not_mutated(tmp_path):
    args = make_args(tmp_path, max_grad_norm=0.5)
    trainer = SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_method="gasam:alpha=0.5")
    assert args.max_grad_norm == 0.5 and trainer.args.max_grad_norm == 0.0
    assert trainer.sam_max_grad_norm == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_method="nope")
    with pytest.raises(ValueError, match="TrainingArguments"):
        SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_kwargs={"lr": 1.0})
    with pytest.raises(ValueError, match="ascent_steps"):
        SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_method="gasam:ascent_steps=2")
    with pytest.raises(ValueError, match="perturb_every"):
        SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_method="sam:perturb_every=2")
    for one_pass in ("msam", "mfsam", "mpfsam"):
        with pytest.raises(ValueError, match="AcceleratedStep"):
            SharpnessAwareTrainer(model=tiny_gpt2(), args=args, sam_method=one_pass)
    with pytest.raises(ValueError, match="AdamW"):
        SharpnessAwareTrainer(model=tiny_gpt2(), args=make_args(tmp_path, optim="sgd"))
    with pytest.raises(ValueError, match="adamw"):
        model = tiny_gpt2()
        SharpnessAwareTrainer(
            model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None)
        )


# --- mixed precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_bf16_autocast(tmp_path, method):
    """bf16 through accelerate: the logits come back as float32 copies; fsam's r is still found."""
    results = {}
    for bf16 in (False, True):
        model = tiny_gpt2()
        before = params_of(model)
        trainer = SharpnessAwareTrainer(
            model=model,
            args=make_args(tmp_path / str(bf16), bf16=bf16, max_steps=1),
            train_dataset=lm_data(8),
            sam_method=method,
        )
        trainer.train()
        after = params_of(model)
        results[bf16] = torch.cat([(after[n] - before[n]).flatten() for n in before])
        assert torch.isfinite(results[bf16]).all()
    assert F.cosine_similarity(results[True], results[False], dim=0) > 0.95


def _with_scaler(trainer: SharpnessAwareTrainer, scale: float) -> torch.amp.GradScaler:
    """What accelerate sets up for fp16 on a GPU; on CPU it makes none, so give it one."""
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    return scaler


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_grad_scaler_gives_the_unscaled_update(tmp_path, method):
    results = []
    for scale in (None, 2.0**12):
        model = tiny_gpt2()
        trainer = SharpnessAwareTrainer(
            model=model,
            args=make_args(tmp_path / str(scale), max_grad_norm=0.05),
            train_dataset=lm_data(8),
            sam_method=method,
        )
        if scale is not None:
            scaler = _with_scaler(trainer, scale)
        trainer.train()
        results.append(params_of(model))
    assert scaler.get_scale() == 2.0**12  # no overflow, no backoff
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_grad_scaler_overflow_in_second_pass_skips_the_step(tmp_path, method):
    model = tiny_gpt2()
    before = params_of(model)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=lm_data(4),
        sam_method=method,
    )
    scaler = _with_scaler(trainer, 2.0**10)
    overflow = OverflowHook({3})  # calls 1-2: clean pass, 3-4: second pass
    model.transformer.ln_f.register_forward_hook(overflow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an fp16 overflow is routine: no warning
        trainer.train()
    assert overflow.count == 4
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert scaler.get_scale() == 2.0**9
    assert trainer.sam_optimizer.skipped_steps == 1
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["skipped_steps"] for entry in logged] == [1]  # the one overflow planted
    # Fused AdamW skips on the device: its state may exist, but no step was counted.
    assert all(float(s["step"]) == 0 for s in trainer.sam_optimizer.base_optimizer.state.values())
    assert trainer.optimizer.step_was_skipped  # so the LR scheduler did not step
    assert trainer.lr_scheduler.last_epoch == 0


def test_grad_scaler_overflow_in_clean_pass_drops_that_update(tmp_path):
    model = tiny_gpt2()
    trainer = SharpnessAwareTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=lm_data(8),
        sam_method="sam",
    )
    scaler = _with_scaler(trainer, 2.0**10)
    overflow = OverflowHook({1})
    model.transformer.ln_f.register_forward_hook(overflow)
    trainer.train()
    # Update 1: 2 clean forwards, skipped by GradScaler before our step; update 2: 2 + 2.
    assert overflow.count == 6
    assert scaler.get_scale() == 2.0**9
    assert trainer.sam_optimizer.skipped_steps == 0  # the scaler skipped it, not the engine
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.sam_optimizer.state_dict()["state"]  # the second update stepped


@pytest.mark.parametrize(
    ("kwargs", "counts"),
    [
        ({"policy": "looksam", "every": 2}, {"fresh": 2, "reuse": 2, "plain": 0}),
        ({"policy": "interval", "every": 2}, {"fresh": 2, "reuse": 0, "plain": 2}),
    ],
)
def test_a_step_policy_runs_in_the_trainer_and_counts(tmp_path, kwargs, counts):
    """The Trainer path with a policy equals flatlm's own step with it (its plain and LookSAM
    steps skip the replay: the clean gradient is the update's), and counts each kind."""
    rho = 0.1
    model = tiny_gpt2()
    initial = copy.deepcopy(model)
    trainer = Recording(
        model=model,
        args=make_args(tmp_path, max_steps=4, max_grad_norm=1.0),
        train_dataset=lm_data(16),
        sam_method="sam",
        sam_rho=rho,
        sam_kwargs=kwargs,
    )
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    trainer.train()
    assert trainer.sam_optimizer.step_counts == counts
    assert len(calls) == 4 * 2 + counts["fresh"] * 2  # a replay of 2 micro-batches per fresh step
    updates = [trainer.seen[i : i + 2] for i in range(0, 8, 2)]
    reference, _ = reference_run(
        "sam",
        initial,
        updates,
        trainer,
        lr=1e-2,
        weight_decay=0.1,
        betas=(0.9, 0.999),
        eps=1e-8,
        rho=rho,
        max_grad_norm=1.0,
        **kwargs,
    )
    got, want = params_of(model), params_of(reference)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
