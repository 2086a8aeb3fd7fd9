"""One training run: the same init, data order and schedule for every optimizer method.

Everything that decides the trajectory is seeded or checkpointed (model init from ``train.seed``,
a separate ``torch.Generator`` for batch sampling, the global RNG for dropout), so a run resumed
from a checkpoint continues bit for bit on CPU (:mod:`flatlm.lm.checkpoint`).

Under torchrun the model is replicated with DDP (``train.strategy = "ddp"``) or sharded with
FSDP2 (``"fsdp"``: ``fully_shard`` per transformer block / the LSTM, then the root, before the
optimizer is built; sharded checkpoints written by every rank). Every rank runs the same
evaluations; under FSDP2 the sharpness diagnostics run on a full copy of the model gathered for
rank 0 (double backward through ``fully_shard`` crashed the process here).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from flatlm.lm._io import atomic_write_text, own_folder
from flatlm.lm._process import default_threads, stop_on_signals, torch_threads
from flatlm.lm.checkpoint import (
    RunState,
    checkpoint_path,
    has_checkpoint,
    resume_run,
    resume_sharded,
    save_checkpoint,
    save_sharded_checkpoint,
    sharded_temp,
)
from flatlm.lm.config import (
    ConfigError,
    OptimConfig,
    RunConfig,
    TrainConfig,
    check_device_present,
    check_threads_present,
    config_from_dict,
    method_options,
    optimizer_kwargs,
    rho_schedule,
)
from flatlm.lm.data import Corpus, check_windows_fit, get_batch, prepare_corpus, train_split
from flatlm.lm.diagnostics import SharpnessLogger, regime_figures, rng_preserved
from flatlm.lm.evaluate import Batches, autocast, evaluate, fixed_batches, lm_loss
from flatlm.lm.models import GPT, LSTMLM, build_model, count_params
from flatlm.lm.trackers import WANDB_ID_FILE, Tracker, check_trackers, make_trackers
from flatlm.optim.schedules import build_rho_schedule

# The files a run writes atomically: temp files of a killed write of these are removed when the
# folder is next owned.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "checkpoint.pt",
    "result.json",
    WANDB_ID_FILE,
)


# ----------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and embeddings (incl. the tied head) are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.startswith(("wte.", "wpe."))
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, grad_clip: float, total_steps: int | None = None
) -> torch.optim.Optimizer:
    """``flatlm.optim.create`` with the config's hyper-parameters (clipping inside for SAM-types;
    ``total_steps``, the run's length, for a step policy that moves over training)."""
    from flatlm.optim import create

    groups = param_groups(model, cfg.weight_decay)
    base, _ = method_options(cfg)  # the spec's options are in the kwargs, its schedule apart
    return create(base, groups, **optimizer_kwargs(cfg, grad_clip, total_steps))


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float,
) -> torch.Tensor:
    """One optimizer step for any method; returns the clean (unperturbed) loss."""
    from flatlm.optim import SharpnessAwareOptimizer

    def forward() -> torch.Tensor:
        with autocast(x.device):
            return model(x)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return lm_loss(logits, y)

    if isinstance(opt, SharpnessAwareOptimizer):
        return opt.step(forward=forward, loss_fn=loss_fn).detach()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(forward())
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """All records in memory (they go in the checkpoint), mirrored to the trackers of
    ``train.log`` (:mod:`flatlm.lm.trackers`)."""

    def __init__(self, trackers: list[Tracker], records: list[dict[str, Any]] | None = None):
        self.trackers, self.records = trackers, list(records or [])

    def add(self, **record: Any) -> None:
        self.records.append(record)
        for tracker in self.trackers:
            tracker.add(record)

    def flush(self) -> None:
        """The files are rewritten from memory: after a resume they hold exactly the resumed
        history."""
        for tracker in self.trackers:
            tracker.flush()

    def close(self, ok: bool = True) -> None:
        """A last flush and close; after an error (``ok=False``) the files stay as last flushed,
        the streaming trackers are closed (a W&B run marked failed), and an error in closing
        them does not hide the run's own."""
        for tracker in self.trackers:
            if ok:
                tracker.close()
                continue
            with contextlib.suppress(Exception):
                tracker.close(ok=False)


def _validate(run: RunState, batches: Batches, log: MetricsLog) -> float:
    """Validation loss now, logged (and flushed) as a split="val" record."""
    loss = evaluate(run.model, batches)
    ppl = math.exp(min(loss, 50))
    log.add(step=run.step, split="val", loss=loss, ppl=ppl, elapsed_s=run.train_time)
    log.flush()
    return loss


def _checkpoint(path: Path, run: RunState, cfg: RunConfig, corpus: Corpus, log: MetricsLog) -> None:
    """Save the run, then the metrics files (their records are the checkpoint's). Under FSDP2
    every rank writes its shards into the one folder ``path``."""
    save = save_sharded_checkpoint if cfg.train.strategy == "fsdp" else save_checkpoint
    save(path, run, cfg, corpus, log.records)
    log.flush()


def _progress_bar(cfg: RunConfig, step: int, quiet: bool) -> tqdm:
    return tqdm(
        total=cfg.train.steps,
        initial=step,
        disable=quiet or not sys.stderr.isatty(),
        desc=f"{cfg.optim.method} s{cfg.train.seed}",
        unit="step",
        dynamic_ncols=True,
    )


# ----------------------------------------------------------------------------- the run


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    corpus: Corpus | None = None,
    stop_after: int | None = None,
    on_eval: Callable[[int, float], str | None] | None = None,
) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns (and writes ``result.json``) the final numbers.

    ``stop_after`` ends the run after that step with a checkpoint, exactly as Ctrl-C would
    (used by the resume tests). ``on_eval(step, val_loss)`` is called after every validation
    during training; a string it returns ends the run there with status "pruned" and that
    reason (a tuner's pruner, :mod:`flatlm.lm.tune`). The result's ``status`` is "completed",
    "diverged" (finished, but its numbers are not finite or most steps were skipped),
    "interrupted", "stopped" or "pruned", and its ``reason`` says why in words ("" when
    completed). The folder is this process's until
    the call returns: another process training into it gets a ``FolderError``.
    """
    check_device_present(cfg.train.device)
    check_threads_present(cfg.train.threads)
    check_trackers(cfg.train.log)  # a missing package names its extra before anything runs
    threads = cfg.train.threads
    if threads == 0:  # torch's default oversubscribes a busy machine: take this process's share
        threads, why = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if not quiet and int(os.environ.get("RANK", "0")) == 0:
            print(f"flatlm train: {why}", file=sys.stderr, flush=True)
    with torch_threads(threads), _resource_errors(Path(out_dir)):
        return _train(cfg, Path(out_dir), resume, quiet, corpus, stop_after, on_eval)


# A full disk, a quota or a file size limit (ulimit -f): the write failed, the folder is as the
# atomic writes left it (the previous checkpoint kept).
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextlib.contextmanager
def _resource_errors(out: Path) -> Iterator[None]:
    """A full disk or memory as one line naming the fix (exit code 2), not a traceback."""
    from flatlm.lm._io import FolderError

    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        then = (
            f"resume with --resume (the last checkpoint in {out} is kept)"
            if has_checkpoint(out)
            else "run again"
        )
        raise FolderError(
            f"cannot write {e.filename or out}: {e.strerror} (a full disk or a file size "
            f"limit); free space, then {then}"
        ) from e
    except (RuntimeError, MemoryError) as e:  # torch's OutOfMemoryError or allocator, numpy's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        oom = isinstance(e, torch.OutOfMemoryError | MemoryError)
        if not oom and "can't allocate memory" not in first:
            raise
        raise ConfigError(
            f"out of memory: {first[:200]}; use a smaller model (model.size, n_layer, n_embd), "
            "model.block_size, train.batch_size or train.eval_batches/test_batches"
        ) from e


def _train(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    quiet: bool,
    corpus: Corpus | None,
    stop_after: int | None,
    on_eval: Callable[[int, float], str | None] | None = None,
) -> dict[str, Any]:
    sharded = cfg.train.strategy == "fsdp"
    with _process_group(torch.device(cfg.train.device), sharded) as where:
        # Every rank resumes from rank 0's folder; under FSDP2 every rank also writes its shards
        # there (one filesystem for all ranks).
        ckpt = checkpoint_path(out, cfg.train.strategy)
        resume_from = ckpt if resume else None
        with contextlib.ExitStack() as stack:
            if where.rank > 0:  # only rank 0 writes logs: the others into a throwaway folder
                prefix = f"flatlm-rank{where.rank}-"
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
            with own_folder(out, RUN_FILES):
                if resume_from is None:  # every rank: all must stop alike
                    refuse_to_overwrite(ckpt.parent)
                if sharded and where.rank == 0:  # a killed sharded write's leftover
                    shutil.rmtree(sharded_temp(ckpt), ignore_errors=True)
                save_to = ckpt if sharded else out / "checkpoint.pt"
                return _run(
                    cfg, out, save_to, resume_from, quiet, corpus, stop_after, where, on_eval
                )


def refuse_to_overwrite(out: Path) -> None:
    """Without ``--resume``, a folder holding a run (its result or a checkpoint) is not
    trained into: a new run there would replace its records. A FolderError names the run."""
    from flatlm.lm._io import FolderError

    result_path = out / "result.json"
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
            what = f"a {result['status']} run (step {result['step']})"
        except (OSError, ValueError, KeyError, TypeError):
            what = "a run (result.json)"
    elif has_checkpoint(out):
        what = "a run that was stopped (its checkpoint)"
    else:
        return
    raise FolderError(
        f"{out} holds {what}: a new run would replace it; pass --resume to continue (or "
        "re-evaluate) that run, or use another --out"
    )


def _run(
    cfg: RunConfig,
    out: Path,
    ckpt_path: Path,
    resume_from: Path | None,
    quiet: bool,
    corpus: Corpus | None,
    stop_after: int | None,
    where: Placement,
    on_eval: Callable[[int, float], str | None] | None = None,
) -> dict[str, Any]:
    tc, block = cfg.train, cfg.model.block_size
    rank, world, device = where
    corpus = corpus or prepare_corpus(cfg.data)
    train_data = train_split(corpus, cfg.data)  # data.train_tokens: the last N tokens only
    check_windows_fit({**corpus.splits, "train": train_data}, block)  # before the model is built
    run, forward_model = _init_run(cfg, corpus.vocab_size, device, world)
    val_batches = fixed_batches(
        corpus.splits["val"], tc.eval_batches, tc.batch_size, block, "val", device
    )
    resume = resume_sharded if tc.strategy == "fsdp" else resume_run
    records = resume(run, resume_from, cfg, corpus) if resume_from else []
    if resume_from is not None and rank == 0:
        # stdout, like the run's result line: stderr holds only errors and warnings
        print(f"resumed at step {run.step} of {tc.steps} from {out}", flush=True)
    _say_setting_changes(run)
    # From here on this run changes the folder. result.json describes the last run that ended
    # here: there is none while one runs.
    (out / "result.json").unlink(missing_ok=True)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    with _tracked(cfg, out, run, records, resumed=resume_from is not None, rank=rank) as log:
        if run.step == 0 and tc.eval_every > 0:
            _validate(run, val_batches, log)
        sharpness: SharpnessLogger | _GatheredSharpness
        sharpness = SharpnessLogger(cfg, train_data, device)  # never touches the training RNG
        if tc.strategy == "fsdp":
            sharpness = _GatheredSharpness(sharpness, cfg, corpus.vocab_size, rank)
        if run.step == 0:
            sharpness.log(run.model, run.step, log, run.train_time)
        wall0 = time.perf_counter()
        clock = CheckpointClock(tc.checkpoint_minutes)
        status, reason = "completed", ""
        run.model.train()
        with stop_on_signals() as stop, _progress_bar(cfg, run.step, quiet) as bar:
            while run.step < tc.steps:
                # Every rank draws the same global batch and takes its share: one sampler state.
                x, y = get_batch(train_data, tc.batch_size * world, block, run.sampler)
                x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
                t0 = time.perf_counter()
                loss = train_step(forward_model, run.opt, x, y, tc.grad_clip)
                lr = run.opt.param_groups[0]["lr"]
                run.sched.step()
                if run.rho_sched is not None:
                    run.rho_sched.step()
                if device.type == "cuda":  # honest step times: wait for the queued kernels
                    torch.cuda.synchronize(device)
                run.train_time += time.perf_counter() - t0
                run.step += 1
                bar.update(1)
                if run.step % tc.log_every == 0 or run.step == tc.steps:
                    loss_value = loss.item()  # the only host read of the loss: on log steps
                    log.add(
                        step=run.step,
                        split="train",
                        loss=loss_value,
                        lr=lr,
                        elapsed_s=run.train_time,
                    )
                    bar.set_postfix(loss=f"{loss_value:.3f}")
                if tc.eval_every > 0 and (run.step % tc.eval_every == 0 or run.step == tc.steps):
                    val = _validate(run, val_batches, log)
                    bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}")
                    pruned = on_eval(run.step, val) if on_eval is not None else None
                    if pruned and run.step < tc.steps:
                        status, reason = "pruned", pruned
                        break
                sharpness.log(run.model, run.step, log, run.train_time)
                # All ranks stop, and checkpoint, at one step: the flags of any rank count.
                stopping, timed = _on_any_rank([stop.is_set(), clock.due()], world, device)
                if stopping:
                    status, reason = "interrupted", f"SIGINT or SIGTERM during step {run.step}"
                    break
                if run.step == stop_after:
                    status, reason = "stopped", f"stop_after={stop_after}"
                    break
                if timed or (tc.checkpoint_every > 0 and run.step % tc.checkpoint_every == 0):
                    _checkpoint(ckpt_path, run, cfg, corpus, log)
                    clock.reset()
        _checkpoint(ckpt_path, run, cfg, corpus, log)

        result = _result(cfg, run, status, corpus.vocab_size, time.perf_counter() - wall0)
        if status == "completed":
            result |= _final_losses(cfg, run, corpus, train_data, val_batches, log, world)
            reason = _divergence(result)
            if reason:
                status = "diverged"
            else:  # the Lanczos products of a diverged model would be noise, or raise
                result |= sharpness.final(run.model)
        result |= {"status": status, "reason": reason}
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    return result


@contextlib.contextmanager
def _tracked(
    cfg: RunConfig,
    out: Path,
    run: RunState,
    records: list[dict[str, Any]],
    resumed: bool,
    rank: int,
) -> Iterator[MetricsLog]:
    """The run's MetricsLog over the trackers of ``train.log``, closed when the block ends; after
    an error only the streaming trackers are closed (a W&B run marked failed, TensorBoard's
    writer thread ended), the files stay as last flushed."""
    tc = cfg.train
    trackers = make_trackers(
        tc.log,
        out,
        records,
        config=cfg.to_dict(),
        start_step=run.step,
        resume=resumed,
        rank=rank,
        wandb_project=tc.wandb_project,
        wandb_mode=tc.wandb_mode,
    )
    log = MetricsLog(trackers, records)
    try:
        yield log
    except BaseException:
        log.close(ok=False)
        raise
    log.close()


def _say_setting_changes(run: RunState) -> None:
    """Tell what a resume changed (result.json records it as ``setting_changes``)."""
    now = [c for c in run.setting_changes if c["step"] == run.step]
    if now:
        changes = ", ".join(f"{c['key']} {c['was']!r} -> {c['now']!r}" for c in now)
        print(f"resuming at step {run.step} with changed settings: {changes}", file=sys.stderr)


def _divergence(result: dict[str, Any]) -> str:
    """Why a finished run's numbers cannot stand for the method ("" when they can)."""
    reasons = []
    bad = [k for k in ("val_loss", "test_loss", "train_loss") if not math.isfinite(result[k])]
    if bad:
        reasons.append(f"non-finite final {', '.join(bad)}")
    skipped, steps = result["skipped_steps"], result["step"]
    if 2 * skipped > steps:
        reasons.append(f"{skipped} of {steps} steps skipped for a non-finite loss or gradient")
    return "; ".join(reasons)


def _init_run(
    cfg: RunConfig, vocab_size: int, device: torch.device, world: int
) -> tuple[RunState, nn.Module]:
    """The run at step 0, and the module the training passes go through."""
    torch.manual_seed(cfg.train.seed)  # the same init for every method with this seed
    model = build_model(cfg.model, vocab_size).to(device)
    if cfg.train.compile:
        _compile(model)
    sharded = cfg.train.strategy == "fsdp"
    if sharded:  # before the optimizer: it must see the DTensor parameters
        _fully_shard(model, device, world)
    opt = make_optimizer(model, cfg.optim, cfg.train.grad_clip, cfg.train.steps)
    # Under torchrun with DDP the passes go through the DDP wrapper (gradients all-reduced: ε
    # from the global gradient); evaluation and checkpoints use the plain module. Under FSDP2
    # the sharded module is both (its gradients are reduce-scattered; the workbench takes one
    # micro-batch per step, so no gradient_sync is needed).
    forward_model = _ddp(model, device) if world > 1 and not sharded else model
    sampler = torch.Generator().manual_seed(cfg.train.seed)
    run = RunState(model, opt, LambdaLR(opt, lr_lambda(cfg.train)), sampler, device)
    # Fractions of train.steps: a resume with more steps stretches the schedule as it does the
    # cosine (the checkpoint restores only the position).
    run.rho_sched = build_rho_schedule(opt, rho_schedule(cfg.optim), cfg.train.steps)
    return run, forward_model


def _fully_shard(model: nn.Module, device: torch.device, world: int) -> None:
    """FSDP2 over all ranks: ``fully_shard`` on each transformer block (GPT) or on the LSTM
    (``nn.LSTM`` holds all its layers in one module), then on the root (embeddings, final norm,
    the tied head). Each rank keeps its rows of every parameter; the shards are uneven when a
    dimension does not divide by the number of ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    if isinstance(model, GPT):
        units: list[nn.Module] = list(model.blocks)
    elif isinstance(model, LSTMLM):
        units = [model.lstm]
    else:  # pragma: no cover - build_model makes one of the two
        raise TypeError(f"no FSDP2 layout for {type(model).__name__}")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _compile(model: nn.Module) -> None:
    """``train.compile``: the model's forward compiled in place (docs/compile.md), before the
    optimizer and DDP see it. In place, so checkpoints keep the plain module's state_dict keys
    (no ``_orig_mod.`` prefix) and load into an uncompiled model. Inductor compiles at the
    first forward; evaluation (eval mode, no grad) compiles one more graph at its first call.
    The sharpness diagnostics run the forward eagerly (double backward, which compiled graphs
    do not support: :func:`flatlm.lm.diagnostics.eager`)."""
    from flatlm.optim.compile import compile_model

    try:
        compile_model(model)
    except RuntimeError as e:  # no C++ compiler for Inductor on CPU: one line, naming the key
        raise ConfigError(f"config key 'train.compile' is true but {e}") from e


def _result(
    cfg: RunConfig, run: RunState, status: str, vocab_size: int, wall_time: float
) -> dict[str, Any]:
    """What every run reports, finished or not."""
    return {
        "method": cfg.optim.method,
        "seed": cfg.train.seed,
        "status": status,
        "step": run.step,
        "steps": cfg.train.steps,
        "params": count_params(run.model),
        "vocab_size": vocab_size,
        "train_time_s": run.train_time,
        "time_per_step_s": run.train_time / max(run.step, 1),
        "wall_time_s": wall_time,
        "skipped_steps": int(getattr(run.opt, "skipped_steps", 0)),
        "setting_changes": run.setting_changes,
        "rho_schedule": rho_schedule(cfg.optim),
        **step_cost(run.opt, run.step),
    }


def step_cost(opt: torch.optim.Optimizer, steps: int) -> dict[str, Any]:
    """What the run paid: ``step_counts`` (fresh two-pass, reuse and plain one-pass steps, as the
    optimizer counted them; plain AdamW's steps are all plain) and ``passes_per_step``
    (forward–backward passes per step, a fresh step counting two). None where the optimizer
    does not count its steps."""
    from flatlm.optim import SharpnessAwareOptimizer

    counts = getattr(opt, "step_counts", None)
    if counts is None and not isinstance(opt, SharpnessAwareOptimizer):
        counts = {"fresh": 0, "reuse": 0, "plain": steps}
    if counts is None:
        return {"step_counts": None, "passes_per_step": None}
    counts = {k: int(counts[k]) for k in ("fresh", "reuse", "plain")}
    passes = (2 * counts["fresh"] + counts["reuse"] + counts["plain"]) / max(steps, 1)
    return {"step_counts": counts, "passes_per_step": passes}


def _final_losses(
    cfg: RunConfig,
    run: RunState,
    corpus: Corpus,
    train_data: np.ndarray,
    val_batches: Batches,
    log: MetricsLog,
    world: int,
) -> dict[str, Any]:
    """A completed run's final validation and test losses and its regime figures."""
    tc, block = cfg.train, cfg.model.block_size
    val = [r for r in log.records if r["split"] == "val" and r["step"] == run.step]
    val_loss = val[-1]["loss"] if val else _validate(run, val_batches, log)
    test_data = corpus.splits["test"]
    test_batches = fixed_batches(
        test_data, tc.test_batches, tc.batch_size, block, "test", run.device
    )
    test_loss = evaluate(run.model, test_batches)
    log.add(step=run.step, split="test", loss=test_loss, elapsed_s=run.train_time)
    figures = {
        "val_loss": val_loss,
        "test_loss": test_loss,
        "val_ppl": math.exp(min(val_loss, 50)),
        "test_ppl": math.exp(min(test_loss, 50)),
    }
    regime = regime_figures(
        run.model, cfg, train_data, run.step, run.device, world, run.setting_changes
    )
    return figures | regime


# ----------------------------------------------------------------------------- distributed


class Placement(NamedTuple):
    """Where this process trains: its rank, the number of processes, its device."""

    rank: int
    world: int
    device: torch.device


@contextlib.contextmanager
def _process_group(device: torch.device, sharded: bool) -> Iterator[Placement]:
    """Under ``torchrun`` (WORLD_SIZE > 1) joins the process group (NCCL on CUDA, gloo on CPU)
    and puts each rank on its own GPU. FSDP2 in a single process (``train.strategy = "fsdp"``
    without torchrun) gets a process group of one rank for the run, destroyed at its end."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not sharded:
        yield Placement(0, 1, device)
        return
    import torch.distributed as dist

    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL and the device mesh use the current device
    ours = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:  # a mesh of one rank: no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            ours = True
    try:
        yield Placement(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if ours:
            dist.destroy_process_group()


def _on_any_rank(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """Whether each flag is set on some rank (one tiny all-reduce): a signal (or a clock)
    reaches the ranks at different steps, and all must stop or checkpoint after the same one."""
    if world == 1:
        return flags
    import torch.distributed as dist

    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class CheckpointClock:
    """``train.checkpoint_minutes``: due once that many minutes (wall clock) have passed since
    the run started or last checkpointed; never with 0."""

    def __init__(self, minutes: float):
        self.seconds = 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


class _GatheredSharpness:
    """The sharpness diagnostics of an FSDP2 run: every Hessian-vector product is a double
    backward, which through ``fully_shard`` crashed the process (SIGSEGV, torch 2.13, gloo), so
    at each due step every rank takes part in gathering the full parameters and rank 0 computes
    the figures on a plain copy of the model (which must fit on one device). The other ranks log
    nothing (their logs are thrown away) and wait at the next collective."""

    def __init__(self, inner: SharpnessLogger, cfg: RunConfig, vocab_size: int, rank: int):
        self.inner, self.cfg, self.vocab_size, self.rank = inner, cfg, vocab_size, rank

    def _replica(self, model: nn.Module) -> nn.Module | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 keeps it
        full = get_model_state_dict(model, options=options)  # a collective: every rank
        if self.rank != 0:
            return None
        with rng_preserved(self.inner.device):  # building draws an init: not the run's RNG
            replica = build_model(self.cfg.model, self.vocab_size)
        replica.load_state_dict(full)
        return replica.to(self.inner.device).train(model.training)

    def log(self, model: nn.Module, step: int, log: Any, elapsed_s: float) -> None:
        if self.inner.every > 0 and step % self.inner.every == 0:
            replica = self._replica(model)
            if replica is not None:
                self.inner.log(replica, step, log, elapsed_s)

    def final(self, model: nn.Module) -> dict[str, Any]:
        if not self.inner.final_on:
            return {}
        replica = self._replica(model)
        return self.inner.final(replica) if replica is not None else {}


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run wrote to ``config.json``."""
    return config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
