"""Checkpoints: what a run saves, how it is written and read back, and when it may be resumed.

A checkpoint holds everything that decides the rest of the trajectory (weights, optimizer,
scheduler, the global and the sampler RNG states, the step) plus the metrics so far, so a resumed
run continues bit for bit on CPU. It is written atomically, the previous one kept beside it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from flatlm.lm._io import atomic_write
from flatlm.lm.config import RunConfig, config_from_dict
from flatlm.lm.data import Corpus, prepare_corpus
from flatlm.lm.models import build_model, resolve_dims

CHECKPOINT_FORMAT = "flatlm-lm-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why."""


@dataclass
class RunState:
    """The objects whose state a checkpoint saves and a resume restores, and how far the run got."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: LRScheduler
    sampler: torch.Generator  # batch sampling, apart from the global RNG (dropout)
    device: torch.device
    step: int = 0
    train_time: float = 0.0  # seconds in training steps (no evaluation, no checkpoints)


def model_spec(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What must match for a checkpoint's weights to be this run's weights."""
    spec = {"arch": cfg.model.arch, **resolve_dims(cfg.model), "vocab_size": vocab_size}
    if cfg.model.arch == "gpt":
        spec["block_size"] = cfg.model.block_size
    return spec


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: Path, run: RunState, cfg: RunConfig, corpus: Corpus, metrics: list[dict[str, Any]]
) -> None:
    """Write ``run`` to ``path`` atomically, moving the checkpoint it replaces to
    ``previous_checkpoint(path)`` (what :func:`load_latest_checkpoint` falls back to)."""
    rng = {"torch": torch.get_rng_state(), "sampler": run.sampler.get_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "config": cfg.to_dict(),
        "model_spec": model_spec(cfg, corpus.vocab_size),
        "method": cfg.optim.method,
        "data_fingerprint": corpus.fingerprint,
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "rng": rng,
        "metrics": metrics,
        "train_time_s": run.train_time,
    }
    with atomic_write(path, "wb", durable=True, backup=previous_checkpoint(path)) as f:
        torch.save(state, f)


# ----------------------------------------------------------------------------- load


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


def resume_run(run: RunState, path: Path, cfg: RunConfig, corpus: Corpus) -> list[dict[str, Any]]:
    """Restore ``run`` from the checkpoint at ``path`` (or the previous one) once it is known to
    be this run's; returns the metrics recorded so far."""
    ckpt = load_latest_checkpoint(path)
    check_compatible(ckpt, model_spec(cfg, corpus.vocab_size), cfg, corpus.fingerprint, path)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    run.sampler.set_state(ckpt["rng"]["sampler"])
    run.step, run.train_time = ckpt["step"], ckpt["train_time_s"]
    return ckpt["metrics"]


def load_trained(
    path: str | Path, device: str = "cpu"
) -> tuple[nn.Module, RunConfig, Corpus, dict]:
    """Model, config and corpus of a checkpoint (a ``checkpoint.pt`` or the run folder holding it)."""
    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt_path.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt_path} holds an unusable config: {e}") from e
    corpus = prepare_corpus(cfg.data)
    if corpus.fingerprint != ckpt["data_fingerprint"]:
        raise CheckpointError(
            f"checkpoint {ckpt_path} was trained on another corpus/tokenizer than "
            f"{cfg.data.corpus!r} now holds (data fingerprint differs)"
        )
    model = build_model(cfg.model, corpus.vocab_size)
    model.load_state_dict(ckpt["model"])
    return model.to(device), cfg, corpus, ckpt
