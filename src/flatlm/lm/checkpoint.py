"""Checkpoints: what a run saves, how it is written and read back, and when it may be resumed.

A checkpoint holds everything that decides the rest of the trajectory (weights, optimizer,
scheduler, the global and the sampler RNG states, the step) plus the metrics so far, so a resumed
run continues bit for bit on CPU. It is written atomically, the previous one kept beside it.

It carries its own SHA-256, in the zip comment of the file ``torch.save`` writes (``torch.load``
and zip tools ignore the comment, so it stays a plain torch file): ``torch.load`` does not check
the zip's CRCs, and a flipped byte would otherwise resume with a wrong weight.

Under ``train.strategy = "fsdp"`` the checkpoint is a folder, ``checkpoint.dcp/``, written by
every rank together (:func:`save_sharded_checkpoint`): model and optimizer through
``torch.distributed.checkpoint`` (each rank its shards), ``run_state.pt`` (rank 0: step,
scheduler, sampler, every rank's RNG, metrics, config) and, written last, ``manifest.json`` with
the SHA-256 of every other file, which every rank checks before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from flatlm.lm._io import atomic_write, fsync_path
from flatlm.lm.config import RESUME_ALLOWED, RunConfig, config_from_dict, setting_changes
from flatlm.lm.data import Corpus, prepare_corpus
from flatlm.lm.models import build_model, resolve_dims
from flatlm.optim.schedules import RhoScheduler

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
    rho_sched: RhoScheduler | None = None  # optim.rho_schedule; None: ρ constant


def model_spec(cfg: RunConfig, vocab_size: int) -> dict[str, Any]:
    """What must match for a checkpoint's weights to be this run's weights."""
    spec = {"arch": cfg.model.arch, **resolve_dims(cfg.model), "vocab_size": vocab_size}
    if cfg.model.arch == "gpt":
        spec["block_size"] = cfg.model.block_size
    return spec


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def checkpoint_path(folder: Path, strategy: str) -> Path:
    """Where a run folder's checkpoint is: ``checkpoint.pt``, or the folder ``checkpoint.dcp``
    under ``train.strategy = "fsdp"``."""
    return folder / (SHARDED_NAME if strategy == "fsdp" else "checkpoint.pt")


def has_checkpoint(folder: Path) -> bool:
    """Whether a run folder holds a checkpoint to resume from, of either kind (the latest or
    the previous one: a kill between the two renames leaves only the previous)."""
    latest = [Path("checkpoint.pt"), Path(SHARDED_NAME)]
    names = [p.name for p in latest] + [previous_checkpoint(p).name for p in latest]
    return any((folder / name).exists() for name in names)


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: Path, run: RunState, cfg: RunConfig, corpus: Corpus, metrics: list[dict[str, Any]]
) -> None:
    """Write ``run`` to ``path`` atomically, moving the checkpoint it replaces to
    ``previous_checkpoint(path)`` (what :func:`load_latest_checkpoint` falls back to)."""
    rng = {"torch": torch.get_rng_state(), "sampler": run.sampler.get_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = _run_record(run, cfg, corpus, metrics, CHECKPOINT_FORMAT) | {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "rng": rng,
    }
    with atomic_write(path, "wb", durable=True, backup=previous_checkpoint(path)) as f:
        sealed = _Sealed(f)
        try:
            torch.save(state, sealed)
        except RuntimeError:
            if sealed.error is not None:  # torch reports a failed write as a zip position error
                raise sealed.error from None
            raise
        sealed.seal()


def _run_record(
    run: RunState, cfg: RunConfig, corpus: Corpus, metrics: list[dict[str, Any]], fmt: str
) -> dict[str, Any]:
    """What either kind of checkpoint holds besides the model, the optimizer and the RNG."""
    return {
        "format": fmt,
        "step": run.step,
        "config": cfg.to_dict(),
        "model_spec": model_spec(cfg, corpus.vocab_size),
        "method": cfg.optim.method,
        "data_fingerprint": corpus.fingerprint,
        "scheduler": run.sched.state_dict(),
        "rho_scheduler": run.rho_sched.state_dict() if run.rho_sched else None,
        "metrics": metrics,
        "train_time_s": run.train_time,
        "setting_changes": run.setting_changes,
    }


def _restore_run_record(
    run: RunState, state: dict[str, Any], allowed: list[tuple[str, Any, Any]]
) -> list[dict[str, Any]]:
    """The scheduler, sampler, step and settings of :func:`_run_record`, with the settings this
    resume changed (``allowed``) appended; returns the metrics so far."""
    run.sched.load_state_dict(state["scheduler"])
    if run.rho_sched is not None:  # the position only: the bounds follow train.steps, as the LR
        run.rho_sched.load_state_dict({"last_step": state["rho_scheduler"]["last_step"]})
    run.sampler.set_state(state["rng"]["sampler"])
    run.step, run.train_time = state["step"], state["train_time_s"]
    run.setting_changes = [
        *state.get("setting_changes", []),
        *({"step": run.step, "key": k, "was": was, "now": now} for k, was, now in allowed),
    ]
    return state["metrics"]


class _Sealed:
    """A write-only file for ``torch.save`` that hashes what goes through and holds back the
    zip's last record, whose comment then gets the digest (:func:`_verify` checks it)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha, self.tail = f, hashlib.sha256(), b""
        self.error: OSError | None = None  # the first failed write (a full disk)

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
        try:
            self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

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


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint of either kind against its SHA-256(s) without loading it: a
    ``CheckpointError`` naming what is wrong."""
    if path.is_dir():
        problems = sharded_problems(path)
        if problems:
            raise CheckpointError("; ".join(problems))
        return
    try:
        with open(path, "rb") as f:
            _verify(f, path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e.strerror or e}") from e


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
    _check_kind(path, sharded=False)
    ckpt = load_latest_checkpoint(path)
    spec = model_spec(cfg, corpus.vocab_size)
    allowed = check_compatible(ckpt, spec, cfg, corpus.fingerprint, path)
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if run.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return _restore_run_record(run, ckpt, allowed)


def load_trained(
    path: str | Path, device: str = "cpu", data: str | Path | None = None
) -> tuple[nn.Module, RunConfig, Corpus, dict]:
    """Model, config and corpus of a checkpoint (a ``checkpoint.pt`` or the run folder holding
    it). ``data``: where the run's corpus is now, if not at the path the run recorded (the
    data fingerprint still has to match)."""
    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() and path.suffix != ".dcp" else path
    if path.is_dir() and not ckpt_path.exists() and (path / SHARDED_NAME).is_dir():
        ckpt_path = path / SHARDED_NAME  # an FSDP2 run's folder
    if ckpt_path.is_dir():
        return _load_trained_sharded(ckpt_path, device, data)
    if not ckpt_path.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path)
    cfg = _config_of(ckpt, ckpt_path)
    corpus = _trained_corpus(cfg, ckpt, ckpt_path, data)
    model = build_model(cfg.model, corpus.vocab_size)
    model.load_state_dict(ckpt["model"])
    return model.to(device), cfg, corpus, ckpt


def _corpus_path(stored: str, ckpt_path: Path) -> str:
    """The recorded corpus path, found again: as recorded (absolute; older runs recorded it
    relative to the directory they were started in), else relative to a folder above the checkpoint (a
    run under ``runs/`` was started beside them)."""
    if stored == "sotu" or Path(stored).exists():
        return stored
    if not Path(stored).is_absolute():
        for folder in Path(os.path.abspath(ckpt_path)).parents:
            if (folder / stored).exists():
                return str(folder / stored)
    raise CheckpointError(
        f"the corpus of {ckpt_path} is not at {stored!r} (the path its run recorded): pass "
        "--data PATH with where that text is now"
    )


def _trained_corpus(
    cfg: RunConfig, ckpt: dict[str, Any], path: Path, data: str | Path | None = None
) -> Corpus:
    if data is not None:
        cfg.data.corpus = os.path.abspath(data) if str(data) != "sotu" else "sotu"
    cfg.data.corpus = _corpus_path(cfg.data.corpus, path)
    corpus = prepare_corpus(cfg.data)
    if corpus.fingerprint != ckpt["data_fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on another corpus/tokenizer than "
            f"{cfg.data.corpus!r} now holds (data fingerprint differs)"
        )
    return corpus


# ----------------------------------------------------------------------------- sharded (FSDP2)

SHARDED_FORMAT = "flatlm-lm-sharded-checkpoint-1"
SHARDED_NAME = "checkpoint.dcp"  # the folder; the previous one is checkpoint.prev.dcp
RUN_STATE_NAME = "run_state.pt"  # written by rank 0: everything but the model and optimizer
MANIFEST_NAME = "manifest.json"  # written last, by rank 0: the SHA-256 of every other file


def sharded_temp(path: Path) -> Path:
    """The folder a sharded checkpoint is written in before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.tmp")


def _group() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _group()[1] > 1:
        dist.barrier()


def _gathered(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    import torch.distributed as dist

    world = _group()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _check_kind(path: Path, sharded: bool) -> None:
    """A folder holding the other kind of checkpoint than this run writes is refused by name
    (train.strategy may not change on resume: the config check would say so, but only after
    looking for a checkpoint that is not there)."""
    other = path.with_name("checkpoint.pt" if sharded else SHARDED_NAME)
    here = [path, previous_checkpoint(path)]
    if not any(p.exists() for p in here) and (
        other.exists() or previous_checkpoint(other).exists()
    ):
        now, then = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
        raise CheckpointError(
            f"no checkpoint at {path}, but {path.parent} holds one of train.strategy = "
            f"{then!r} ({other.name}) and this run has train.strategy = {now!r}: resume with "
            f"train.strategy={then}"
        )


def save_sharded_checkpoint(
    path: Path, run: RunState, cfg: RunConfig, corpus: Corpus, metrics: list[dict[str, Any]]
) -> None:
    """Every rank together: write ``run`` (an FSDP2 model) to the folder ``path`` atomically,
    moving the one it replaces to ``previous_checkpoint(path)``.

    All ranks write into ``sharded_temp(path)``: model and optimizer by
    ``torch.distributed.checkpoint`` (``get_state_dict`` + ``dcp.save``, each rank its shards),
    then rank 0 the run state (every rank's RNG gathered), then each rank hashes (and fsyncs)
    every world-th file, and rank 0 writes the manifest of all digests last and renames the
    folder into place. The run folder must be one filesystem that every rank sees.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world = _group()
    tmp = sharded_temp(path)
    if rank == 0:  # a killed write's leftover goes first
        _remove_tree(tmp)
        tmp.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(run.model, run.opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    rngs = _gathered(_rng_state(run.device))
    if rank == 0:
        state = _run_record(run, cfg, corpus, metrics, SHARDED_FORMAT) | {
            "world_size": world,
            "rng": {"sampler": run.sampler.get_state(), "ranks": rngs},
        }
        with open(tmp / RUN_STATE_NAME, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    _barrier()
    names = _gathered(sorted(p.name for p in tmp.iterdir()) if rank == 0 else None)[0]
    mine = {}
    for name in names[rank::world]:
        fsync_path(tmp / name)
        mine[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    files = {name: entry for share in _gathered(mine) for name, entry in share.items()}
    if rank == 0:
        manifest = {"format": SHARDED_FORMAT, "step": run.step, "world_size": world}
        with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
            json.dump(manifest | {"files": dict(sorted(files.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        prev = previous_checkpoint(path)
        if path.exists():  # a kill between the renames leaves the previous one: it is loaded
            _remove_tree(prev)
            os.replace(path, prev)
        os.replace(tmp, path)
        fsync_path(path.parent)
    _barrier()


def sharded_problems(path: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with the sharded checkpoint folder ``path`` ([] if nothing): no manifest,
    or a file of the manifest missing or not of its size and SHA-256. ``share`` = (rank, world)
    checks every world-th file only, from the rank-th (the default: all of them)."""
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        return [f"no checkpoint to resume from at {path}"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != SHARDED_FORMAT or not isinstance(files, dict):
            raise ValueError(f"not format {SHARDED_FORMAT}")
    except FileNotFoundError:
        return [f"checkpoint {path} is incomplete: it has no {MANIFEST_NAME} (written last)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"checkpoint {path} has an unreadable {MANIFEST_NAME} ({e})"]
    if RUN_STATE_NAME not in files or ".metadata" not in files:
        return [f"checkpoint {path} is not a flatlm sharded checkpoint (its manifest lacks files)"]
    problems = _unlisted(path, files, manifest.get("world_size"))
    rank, world = share
    for name in sorted(files)[rank::world]:
        file = path / name
        if not file.is_file():
            problems.append(f"checkpoint {path} is incomplete: {name} is missing")
        elif file.stat().st_size != files[name]["bytes"] or _sha256(file) != files[name]["sha256"]:
            problems.append(
                f"checkpoint {path} is corrupt or truncated: the SHA-256 of {name} does not "
                f"match the one in its {MANIFEST_NAME}"
            )
    return problems


def _unlisted(path: Path, files: dict[str, Any], world_size: Any) -> list[str]:
    """Files that the manifest should list and does not: every file in the folder (one not
    listed cannot be verified, and ``dcp.load`` would read it) and the shard of every rank
    that saved (``__<rank>_0.distcp``, torch.distributed.checkpoint's name)."""
    present = {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    ranks = range(world_size) if isinstance(world_size, int) and world_size > 0 else range(0)
    expected = {f"__{r}_0.distcp" for r in ranks}
    return [
        f"checkpoint {path} is not verifiable: its {MANIFEST_NAME} does not list {name}"
        + ("" if name in present else f" (of rank {name[2:].split('_')[0]}, also missing)")
        for name in sorted((present | expected) - set(files))
    ]


def _verify_sharded(path: Path) -> None:
    """Every rank checks a share of the files; all learn every problem, so all decide alike."""
    rank, world = _group()
    try:
        mine = sharded_problems(path, (rank, world))
    except OSError as e:  # every rank must reach the gather below, whatever it found
        mine = [f"checkpoint {path} cannot be read: {e}"]
    problems = [p for share in _gathered(mine) for p in share]
    if problems:
        raise CheckpointError("; ".join(dict.fromkeys(problems)))


def read_run_state(path: Path) -> dict[str, Any]:
    """The run state (``run_state.pt``) of the sharded checkpoint folder ``path``; verify the
    folder first (:func:`sharded_problems`)."""
    try:
        state = torch.load(path / RUN_STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} has an unreadable {RUN_STATE_NAME} ({type(e).__name__})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{path} is not a flatlm sharded checkpoint ({SHARDED_FORMAT})")
    return state


def load_latest_sharded(path: Path) -> tuple[Path, dict[str, Any]]:
    """Every rank together: the verified sharded checkpoint at ``path`` or, if it is missing,
    incomplete or damaged, the previous one (with a warning naming why), and its run state; a
    ``CheckpointError`` naming both if neither can be used."""
    rank = _group()[0]
    try:
        _verify_sharded(path)
        return path, read_run_state(path)
    except CheckpointError as latest_error:
        prev = previous_checkpoint(path)
        if not prev.is_dir():
            raise
        try:
            _verify_sharded(prev)
            state = read_run_state(prev)
        except CheckpointError as prev_error:
            raise CheckpointError(f"{latest_error}; and the previous one: {prev_error}") from None
        if rank == 0:
            warnings.warn(
                f"{latest_error}; resuming from the previous checkpoint {prev}", stacklevel=2
            )
        return prev, state


def resume_sharded(
    run: RunState, path: Path, cfg: RunConfig, corpus: Corpus
) -> list[dict[str, Any]]:
    """Every rank together: restore ``run`` (an FSDP2 model) from the sharded checkpoint at
    ``path`` (or the previous one) once it is verified and known to be this run's; returns the
    metrics so far. ``torch.distributed.checkpoint`` reshards model and optimizer for any number
    of ranks; a different number than at the save is recorded in ``setting_changes`` as
    ``world_size``. Rank r takes rank r's RNG state (rank 0's if the save had no rank r)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _check_kind(path, sharded=True)
    where, state = load_latest_sharded(path)
    spec = model_spec(cfg, corpus.vocab_size)
    allowed = check_compatible(state, spec, cfg, corpus.fingerprint, where)
    rank, world = _group()
    if state["world_size"] != world:
        allowed.append(("world_size", state["world_size"], world))
    model_state, optim_state = get_state_dict(run.model, run.opt)
    loaded = {"model": model_state, "optimizer": optim_state}
    dcp.load(loaded, checkpoint_id=where)
    set_state_dict(
        run.model,
        run.opt,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
    )
    ranks = state["rng"]["ranks"]
    rng = ranks[rank] if rank < len(ranks) else ranks[0]
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    return _restore_run_record(run, state, allowed)


def _config_of(state: dict[str, Any], path: Path) -> RunConfig:
    try:
        return config_from_dict(state["config"])
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} holds an unusable config: {e}") from e


def _load_trained_sharded(
    path: Path, device: str, data: str | Path | None = None
) -> tuple[nn.Module, RunConfig, Corpus, dict]:
    """``load_trained`` of a sharded checkpoint, in one process: verified, then the model's
    shards assembled into a plain (unsharded) model."""
    import torch.distributed.checkpoint as dcp

    problems = sharded_problems(path, (0, 1))
    if problems:
        raise CheckpointError("; ".join(problems))
    state = read_run_state(path)
    cfg = _config_of(state, path)
    corpus = _trained_corpus(cfg, state, path, data)
    model = build_model(cfg.model, corpus.vocab_size)
    loaded = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(loaded, checkpoint_id=path, no_dist=True)
    model.load_state_dict(loaded["model"])
    return model.to(device), cfg, corpus, state
