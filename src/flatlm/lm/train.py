"""One training run: the same init, data order and schedule for every optimizer method.

Everything that decides the trajectory is seeded or checkpointed (model init from ``train.seed``,
a separate ``torch.Generator`` for batch sampling, the global RNG for dropout), so a run resumed
from a checkpoint continues bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from flatlm.lm.config import (
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    method_options,
)
from flatlm.lm.data import Corpus, atomic_write_text, eval_batches, get_batch, prepare_corpus
from flatlm.lm.diagnostics import SharpnessLogger, regime_figures, train_split
from flatlm.lm.models import build_model, count_params, resolve_dims

CHECKPOINT_FORMAT = "flatlm-lm-checkpoint-1"
CSV_FIELDS = ("step", "split", "loss", "ppl", "lr", "elapsed_s")
SHARPNESS_FIELDS = ("hessian.lambda_max", "sam.logit_functional_ratio")  # split="sharpness" rows


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why."""


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


def make_optimizer(model: nn.Module, cfg: OptimConfig, grad_clip: float) -> torch.optim.Optimizer:
    """``flatlm.optim.create`` with the config's hyper-parameters (clipping inside for SAM-types)."""
    from flatlm.optim import create

    base, kwargs = method_options(cfg)
    if base != "adamw":
        kwargs["max_grad_norm"] = grad_clip if grad_clip > 0 else None
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    return create(
        cfg.method, groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, **kwargs
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# ----------------------------------------------------------------------------- steps


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


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
        with _autocast(x.device):
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


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean per-token cross-entropy over fixed batches (eval mode: no dropout, no RNG use)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with _autocast(x.device):
            logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """Write to a temp file in the same folder, fsync, then ``os.replace``: never a half-written
    file. ``keep_previous`` first moves the old file to ``previous_checkpoint(path)``, so a later
    unreadable checkpoint (a full disk, a copy cut short) still leaves one to resume from."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def load_latest_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or, if that one is missing or unreadable, the previous one
    (with a warning naming why); a ``CheckpointError`` if neither can be read."""
    try:
        return load_checkpoint(path)
    except CheckpointError as latest_error:
        prev = previous_checkpoint(path)
        if not prev.is_file():
            raise
        ckpt = load_checkpoint(prev)
        warnings.warn(f"{latest_error}; resuming from the previous checkpoint {prev}", stacklevel=2)
        return ckpt


def model_spec(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What must match for a checkpoint's weights to be this run's weights."""
    spec = {"arch": cfg.model.arch, **resolve_dims(cfg.model), "vocab_size": vocab_size}
    if cfg.model.arch == "gpt":
        spec["block_size"] = cfg.model.block_size
    return spec


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint, turning any unreadable file into a ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a flatlm LM checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def check_compatible(ckpt: dict[str, Any], spec: dict[str, Any], cfg: RunConfig, fp: str, path):
    """Refuse to resume into a different model, optimizer or corpus, naming the difference."""
    problems = [
        f"model.{k} is {ckpt['model_spec'].get(k)!r} in the checkpoint but {v!r} now"
        for k, v in spec.items()
        if ckpt["model_spec"].get(k) != v
    ]
    if ckpt["method"] != cfg.optim.method:
        problems.append(
            f"optim.method is {ckpt['method']!r} in the checkpoint but {cfg.optim.method!r} now"
        )
    if ckpt["data_fingerprint"] != fp:
        problems.append("the corpus/tokenizer differs from the checkpoint's (data fingerprint)")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this run: " + "; ".join(problems))


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """All records in memory (they go in the checkpoint), mirrored to JSONL, CSV, TensorBoard."""

    def __init__(self, out: Path, records: list[dict[str, Any]] | None = None):
        self.out, self.records = out, list(records or [])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, **record: Any) -> None:
        self.records.append(record)
        if self.tb is not None:
            for key in ("loss", *SHARPNESS_FIELDS):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"{key}/{record['split']}", record[key], record["step"])

    def flush(self) -> None:
        """Rewrite both files from memory: after a resume they hold exactly the resumed history."""
        atomic_write_text(
            self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.records)
        )
        buf = io.StringIO()
        extra = [f for f in SHARPNESS_FIELDS if any(f in r for r in self.records)]
        writer = csv.DictWriter(buf, fieldnames=(*CSV_FIELDS, *extra), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, int | None]]:
    """SIGINT/SIGTERM set a flag (the loop checkpoints and returns); a second Ctrl-C aborts."""
    flag: dict[str, int | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the run


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    corpus: Corpus | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns (and writes ``result.json``) the final numbers.

    ``stop_after`` ends the run after that step with a checkpoint, exactly as Ctrl-C would
    (used by the resume tests). The result's ``status`` is "completed", "interrupted" or "stopped".
    """
    threads = torch.get_num_threads()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, Path(out_dir), resume, quiet, corpus, stop_after)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as we found it


def _train(
    cfg: RunConfig,
    out: Path,
    resume: bool,
    quiet: bool,
    corpus: Corpus | None,
    stop_after: int | None,
) -> dict[str, Any]:
    tc = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    rank, world, device = _distributed_setup(torch.device(tc.device))
    run_dir = out  # where the checkpoint is read from; every rank resumes from rank 0's
    if rank > 0:  # only rank 0 writes: the others log and checkpoint into a throwaway folder
        out = Path(tempfile.mkdtemp(prefix=f"flatlm-rank{rank}-"))
    corpus = corpus or prepare_corpus(cfg.data)
    block = cfg.model.block_size
    train_data = train_split(corpus, cfg.data)  # data.train_tokens: the last N tokens only

    torch.manual_seed(tc.seed)  # the same init for every method with this seed
    model = build_model(cfg.model, corpus.vocab_size).to(device)
    opt = make_optimizer(model, cfg.optim, tc.grad_clip)
    # Under torchrun the passes go through DDP (gradients all-reduced: ε from the global
    # gradient); evaluation and checkpoints use the plain module.
    forward_model = _ddp(model, device) if world > 1 else model
    sched = LambdaLR(opt, lr_lambda(tc))
    sampler = torch.Generator().manual_seed(tc.seed)
    spec = model_spec(cfg, corpus.vocab_size)
    val_batches = [
        (x.to(device), y.to(device))
        for x, y in eval_batches(corpus.splits["val"], tc.eval_batches, tc.batch_size, block, "val")
    ]

    ckpt_path = out / "checkpoint.pt"
    step, train_time, records = 0, 0.0, []
    if resume:
        ckpt = load_latest_checkpoint(run_dir / "checkpoint.pt")
        check_compatible(ckpt, spec, cfg, corpus.fingerprint, run_dir / "checkpoint.pt")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        sampler.set_state(ckpt["rng"]["sampler"])
        step, train_time, records = ckpt["step"], ckpt["train_time_s"], ckpt["metrics"]
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
    log = MetricsLog(out, records)

    def save_checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "config": cfg.to_dict(),
            "model_spec": spec,
            "method": cfg.optim.method,
            "data_fingerprint": corpus.fingerprint,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
            "metrics": log.records,
            "train_time_s": train_time,
        }
        _atomic_save(state, ckpt_path, keep_previous=True)
        log.flush()

    def validate() -> float:
        loss = evaluate(model, val_batches)
        log.add(
            step=step, split="val", loss=loss, ppl=math.exp(min(loss, 50)), elapsed_s=train_time
        )
        log.flush()
        return loss

    if step == 0 and tc.eval_every > 0:
        validate()
    sharpness = SharpnessLogger(cfg, train_data, device)  # never touches the training RNG
    if step == 0:
        sharpness.log(model, step, log, train_time)
    wall0 = time.perf_counter()
    status = "completed"
    bar = tqdm(
        total=tc.steps,
        initial=step,
        disable=quiet or not sys.stderr.isatty(),
        desc=f"{cfg.optim.method} s{tc.seed}",
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    with stop_on_signals() as stop, bar:
        while step < tc.steps:
            # Every rank draws the same global batch and takes its share: one sampler state.
            x, y = get_batch(train_data, tc.batch_size * world, block, sampler)
            x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
            t0 = time.perf_counter()
            loss = train_step(forward_model, opt, x, y, tc.grad_clip)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            if device.type == "cuda":  # honest step times: wait for the queued kernels
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t0
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_value = loss.item()  # the only host read of the loss: on log steps
                log.add(step=step, split="train", loss=loss_value, lr=lr, elapsed_s=train_time)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
                bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{validate():.3f}")
            sharpness.log(model, step, log, train_time)
            if stop["signal"] is not None or step == stop_after:
                status = "interrupted" if stop["signal"] is not None else "stopped"
                break
            if tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
                save_checkpoint()
    save_checkpoint()

    result: dict[str, Any] = {
        "method": cfg.optim.method,
        "seed": tc.seed,
        "status": status,
        "step": step,
        "steps": tc.steps,
        "params": count_params(model),
        "vocab_size": corpus.vocab_size,
        "train_time_s": train_time,
        "time_per_step_s": train_time / max(step, 1),
        "wall_time_s": time.perf_counter() - wall0,
        "skipped_steps": int(getattr(opt, "skipped_steps", 0)),
    }
    if status == "completed":
        val = [r for r in log.records if r["split"] == "val" and r["step"] == step]
        result["val_loss"] = val[-1]["loss"] if val else validate()
        test_batches = [
            (x.to(device), y.to(device))
            for x, y in eval_batches(
                corpus.splits["test"], tc.test_batches, tc.batch_size, block, "test"
            )
        ]
        result["test_loss"] = evaluate(model, test_batches)
        log.add(step=step, split="test", loss=result["test_loss"], elapsed_s=train_time)
        result["val_ppl"] = math.exp(min(result["val_loss"], 50))
        result["test_ppl"] = math.exp(min(result["test_loss"], 50))
        result |= regime_figures(model, cfg, train_data, step, device) | sharpness.final(model)
    log.close()
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    return result


def _distributed_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): under ``torchrun`` (WORLD_SIZE > 1) joins the process group
    (NCCL on CUDA, gloo on CPU) and puts each rank on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run wrote to ``config.json``."""
    return config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
