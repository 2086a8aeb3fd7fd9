"""flatlm.integrations.hf: the Trainer path against the engine, clipping, AMP, checkpoints.

Tiny randomly initialised GPT-2 and BERT models on synthetic data; nothing is downloaded.
"""

from __future__ import annotations

import copy
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
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import flatlm.optim
from flatlm.integrations.hf import SharpnessAwareStep, SharpnessAwareTrainer

transformers.logging.set_verbosity_error()

VOCAB = 64
SAM_METHODS = ["sam", "fsam", "psam", "pfsam", "gasam"]


# --- models, data, arguments ------------------------------------------------------------------


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


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


def lm_data(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Arithmetic sequences mod VOCAB: a pattern a tiny model learns in a few steps."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (1,), generator=g)
        ids = (start + 3 * torch.arange(length)) % VOCAB
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


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


def dataset_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
        return float(model(**batch).loss)


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
    opt = flatlm.optim.create(method, groups, fused=True, **kwargs)
    norms: list[float] = []
    opt.base_optimizer.register_step_pre_hook(
        lambda o, a, k: norms.append(float(flatlm.optim.directions.global_norm(grads_of(o))))
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


def grads_of(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]


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
        self.norms.append(float(flatlm.optim.directions.global_norm(grads)))


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


@pytest.mark.parametrize("method", SAM_METHODS)
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


# --- each method trains ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*SAM_METHODS, "adamw"])
def test_each_method_trains_gpt2(tmp_path, method):
    data = lm_data(16)
    model = tiny_gpt2(dropout=0.1)
    before = dataset_loss(model, data)
    trainer = SharpnessAwareTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=24, learning_rate=3e-3, logging_steps=8),
        train_dataset=data,
        sam_method=method,
    )
    trainer.train()
    after = dataset_loss(model, data)
    assert after < before - 0.3, (before, after)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method != "adamw":
        assert trainer.sam_optimizer.skipped_steps == 0


@pytest.mark.parametrize("method", ["sam", "fsam", "adamw"])
def test_sequence_classification(tmp_path, method):
    data = cls_data(16)
    model = tiny_bert()
    before = dataset_loss(model, data)
    SharpnessAwareTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=12, learning_rate=3e-3),
        train_dataset=data,
        sam_method=method,
    ).train()
    after = dataset_loss(model, data)
    assert after < before, (before, after)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- checkpoints ----------------------------------------------------------------------------------


class _StopAt(TrainerCallback):
    """Stops training after global step ``step`` (its checkpoint saved), as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


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
    assert saved["flatlm_method"] and saved["base"]["state"]


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


class _Overflow:
    """A forward hook that makes the given forward calls (1-based) non-finite."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def __call__(self, module, args, output):
        self.count += 1
        return output * float("inf") if self.count in self.calls else None


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
    overflow = _Overflow({3})  # calls 1-2: clean pass, 3-4: second pass
    model.transformer.ln_f.register_forward_hook(overflow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an fp16 overflow is routine: no warning
        trainer.train()
    assert overflow.count == 4
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert scaler.get_scale() == 2.0**9
    assert trainer.sam_optimizer.skipped_steps == 1
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
    overflow = _Overflow({1})
    model.transformer.ln_f.register_forward_hook(overflow)
    trainer.train()
    # Update 1: 2 clean forwards, skipped by GradScaler before our step; update 2: 2 + 2.
    assert overflow.count == 6
    assert scaler.get_scale() == 2.0**9
    assert trainer.sam_optimizer.skipped_steps == 0  # the scaler skipped it, not the engine
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.sam_optimizer.state_dict()["base"]["state"]  # the second update stepped
