"""Checkpoints: what a run saves, how it is written and read back, and when it may be resumed.

A checkpoint holds everything that decides the rest of the trajectory (weights, optimizer,
scheduler, the global and the sampler RNG states, the step) plus the metrics so far, so a resumed
run continues bit for bit on CPU. It is written atomically, the previous one kept beside it.

It carries its own SHA-256, in the zip comment of the file ``torch.save`` writes (``torch.load``
and zip tools ignore the comment, so it stays a plain torch file): ``torch.load`` does not check
the zip's CRCs, and a flipped byte would otherwise resume with a wrong weight.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from flatlm.lm._io import atomic_write
from flatlm.lm.config import RESUME_ALLOWED, RunConfig, config_from_dict, setting_changes
from flatlm.lm.data import Corpus, prepare_corpus
from flatlm.lm.models import build_model, resolve_dims

CHECKPOINT_FORMAT = "flatlm-lm-checkpoint-1"
SUM_TAG = b"flatlm-sha256:"  # the zip comment: this tag, then the hex digest of all bytes before
SUM_LENGTH = len(SUM_TAG) + 64
EOCD, EOCD_SIZE = b"PK\x05\x06", 22  # a zip's last record (then its comment) and its size


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
    # Settings a resume changed (config.RESUME_ALLOWED), as {"step", "key", "was", "now"}.
    setting_changes: list[dict[str, Any]] = field(default_factory=list)


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
        "setting_changes": run.setting_changes,
    }
    with atomic_write(path, "wb", durable=True, backup=previous_checkpoint(path)) as f:
        sealed = _Sealed(f)
        torch.save(state, sealed)
        sealed.seal()


class _Sealed:
    """A write-only file for ``torch.save`` that hashes what goes through and holds back the
    zip's last record, whose comment then gets the digest (:func:`_verify` checks it)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.tail = f, hashlib.sha256(), b""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= EOCD_SIZE:  # large writes (tensor data) pass without a copy
            self._pass(self.tail)
            self._pass(view[:-EOCD_SIZE])
            self.tail = bytes(view[-EOCD_SIZE:])
        else:
            joined = self.tail + bytes(view)
            self._pass(joined[:-EOCD_SIZE])
            self.tail = joined[-EOCD_SIZE:]
        return len(view)

    def flush(self) -> None:
        pass

    def _pass(self, data: bytes | memoryview) -> None:
        self.sha.update(data)
        self.f.write(data)

    def seal(self) -> None:
        """The comment length into the last record, then the digest as the comment."""
        if not (self.tail.startswith(EOCD) and self.tail.endswith(b"\0\0")):
            raise CheckpointError("torch.save did not end with a zip record without a comment")
        self._pass(self.tail[:-2] + SUM_LENGTH.to_bytes(2, "little"))
        self.f.write(SUM_TAG + self.sha.hexdigest().encode())


# ----------------------------------------------------------------------------- load


def _verify(f: IO[bytes], path: Path) -> None:
    """Check the digest in the zip comment against the bytes before it; a checkpoint without
    one (written before checksums) is read with a warning, as it cannot be verified."""
    size = f.seek(0, 2)
    f.seek(max(0, size - SUM_LENGTH - 2))
    end = f.read()
    if size >= EOCD_SIZE and end[-EOCD_SIZE:].startswith(EOCD) and end[-2:] == b"\0\0":
        warnings.warn(
            f"checkpoint {path} has no checksum (older flatlm): not verified", stacklevel=3
        )
        return
    digest, length = end[-SUM_LENGTH:], end[:-SUM_LENGTH][-2:]
    if not digest.startswith(SUM_TAG) or length != SUM_LENGTH.to_bytes(2, "little"):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (its checksum is gone)")
    sha = hashlib.sha256()
    f.seek(0)
    left = size - SUM_LENGTH
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        sha.update(block)
        left -= len(block)
    if sha.hexdigest().encode() != digest[len(SUM_TAG) :]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: its SHA-256 does not match the one "
            "stored in it"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint, turning any unreadable or damaged file into a
    ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    with open(path, "rb") as f:  # one open file: what is verified is what is loaded
        _verify(f, path)
        f.seek(0)
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
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
        try:
            ckpt = load_checkpoint(prev)
        except CheckpointError as prev_error:
            raise CheckpointError(f"{latest_error}; and the previous one: {prev_error}") from None
        warnings.warn(f"{latest_error}; resuming from the previous checkpoint {prev}", stacklevel=2)
        return ckpt


def check_compatible(
    ckpt: dict[str, Any], spec: dict[str, Any], cfg: RunConfig, fp: str, path: Path
) -> list[tuple[str, Any, Any]]:
    """Refuse to resume into another model, optimizer, corpus or any other setting (the
    checkpoint's would win silently: its optimizer state holds its lr and rho), naming every
    difference; returns the changes ``RESUME_ALLOWED`` permits, to be recorded."""
    problems = {
        f"model.{k}": f"model.{k} is {ckpt['model_spec'].get(k)!r} in the checkpoint but {v!r} now"
        for k, v in spec.items()
        if ckpt["model_spec"].get(k) != v
    }
    if ckpt["data_fingerprint"] != fp:
        problems["data"] = "the corpus/tokenizer differs from the checkpoint's (data fingerprint)"
    # Keys an older checkpoint lacks take their defaults, as they did when it was written.
    allowed = []
    for key, was, now in setting_changes(config_from_dict(ckpt["config"]), cfg):
        if key in RESUME_ALLOWED:
            allowed.append((key, was, now))
        else:
            problems.setdefault(key, f"{key} is {was!r} in the checkpoint but {now!r} now")
    if cfg.train.steps < ckpt["step"]:
        problems["train.steps"] = (
            f"train.steps is {cfg.train.steps} but the checkpoint is at step {ckpt['step']}"
        )
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match this run: {'; '.join(problems.values())} "
            "(resume with the settings it was made with, or use another --out)"
        )
    return allowed


def resume_run(run: RunState, path: Path, cfg: RunConfig, corpus: Corpus) -> list[dict[str, Any]]:
    """Restore ``run`` from the checkpoint at ``path`` (or the previous one) once it is known to
    be this run's; returns the metrics recorded so far."""
    ckpt = load_latest_checkpoint(path)
    spec = model_spec(cfg, corpus.vocab_size)
    allowed = check_compatible(ckpt, spec, cfg, corpus.fingerprint, path)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    run.sampler.set_state(ckpt["rng"]["sampler"])
    run.step, run.train_time = ckpt["step"], ckpt["train_time_s"]
    run.setting_changes = [
        *ckpt.get("setting_changes", []),
        *({"step": run.step, "key": k, "was": was, "now": now} for k, was, now in allowed),
    ]
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
