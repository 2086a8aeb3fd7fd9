"""Where a run's metric records go: ``train.log`` names the trackers (docs/workbench.md).

A record is one dict per measurement: ``step``, ``split`` (train, val, test, sharpness) and
numbers (``loss``, ``ppl``, ``lr``, ``elapsed_s``, the sharpness fields, ...). Every tracker gets
each new record through ``add``, ``flush`` at evaluations and checkpoints, and ``close`` once at
the end (``ok=False`` after an error).

- ``jsonl`` / ``csv``: ``metrics.jsonl`` / ``metrics.csv``, rewritten whole from the records in
  memory on every flush, so after a resume they hold exactly the resumed history (the records
  are the checkpoint's). ``metrics.jsonl`` is the run's record that ``flatlm report`` and
  ``flatlm compare`` read, so ``train.log`` must name it.
- ``tensorboard``: event files in ``tb/`` (the ``[tensorboard]`` extra).
- ``wandb``: a Weights & Biases run in ``wandb/`` (the ``[wandb]`` extra), offline by default;
  a resumed run continues the W&B run whose id the folder holds (``wandb_id.txt``).

The streaming trackers (TensorBoard, W&B) get only the records made by this process, never the
resumed history again, and only on rank 0 under torchrun.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from flatlm._extras import MissingExtraError, require
from flatlm.lm._io import atomic_write_text

CSV_FIELDS = ("step", "split", "loss", "ppl", "lr", "elapsed_s")
SHARPNESS_FIELDS = ("hessian.lambda_max", "sam.logit_functional_ratio")  # split="sharpness" rows
# Every tracker train.log may name -> the package it needs and the flatlm extra that installs it
# (None: the workbench's own).
TRACKERS: dict[str, tuple[str, str] | None] = {
    "jsonl": None,
    "csv": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb_id.txt"
FILES = {"jsonl": "metrics.jsonl", "csv": "metrics.csv"}


class Tracker(Protocol):
    def add(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self, ok: bool = True) -> None: ...


def missing_package(name: str) -> MissingExtraError | None:
    """The error a run naming tracker ``name`` would stop with, or None when it can run.

    ``find_spec`` rather than an import: wandb takes a second to import, and a config is
    checked before every run of ``flatlm compare``."""
    need = TRACKERS.get(name)
    if need is None:
        return None
    module, extra = need
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) and the like
        found = False
    if found:
        return None
    return MissingExtraError(module, extra, feature=f"train.log = [..., {name!r}]")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as ``"<split>/<key>"`` scalars (``train/loss``, ``val/ppl``,
    ``sharpness/hessian.lambda_max``); None, bools and non-numbers are left out."""
    split = record.get("split", "train")
    return {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "split")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    }


# ----------------------------------------------------------------------------- files


class JsonlTracker:
    """``metrics.jsonl``: one JSON object per record, the file rewritten on every flush."""

    def __init__(self, out: Path, history: Sequence[dict[str, Any]] = ()):
        self.path, self.records = out / FILES["jsonl"], list(history)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def close(self, ok: bool = True) -> None:
        if ok:
            self.flush()


class CsvTracker(JsonlTracker):
    """``metrics.csv``: the columns :data:`CSV_FIELDS`, plus each sharpness field that some
    record has; rewritten on every flush."""

    def __init__(self, out: Path, history: Sequence[dict[str, Any]] = ()):
        super().__init__(out, history)
        self.path = out / FILES["csv"]

    def flush(self) -> None:
        buf = io.StringIO()
        extra = [f for f in SHARPNESS_FIELDS if any(f in r for r in self.records)]
        writer = csv.DictWriter(buf, fieldnames=(*CSV_FIELDS, *extra), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.path, buf.getvalue())


# ----------------------------------------------------------------------------- streaming


class TensorBoardTracker:
    """Scalars ``<split>/<key>`` in ``tb/``. ``purge_step``: TensorBoard hides the events
    at or after the first step this process logs anew (0 for a run from the start; after the
    checkpoint's step for a resume, whose records up to it are the checkpoint's), so what a
    killed run logged past its last checkpoint, or an earlier run in the folder, is not shown
    twice."""

    def __init__(self, out: Path, start_step: int):
        require("tensorboard", "tensorboard", feature="train.log = [..., 'tensorboard']")
        from torch.utils.tensorboard import SummaryWriter

        purge = start_step + 1 if start_step > 0 else 0
        self.writer = SummaryWriter(str(out / "tb"), purge_step=purge)

    def add(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run in ``<out>/wandb/``, named after the folder, with the run config as its
    config. A resume continues the W&B run whose id ``wandb_id.txt`` holds, logging the
    checkpoint's history again first (from W&B's resumed step on: all of it offline, where each
    process writes a file of its own), so the resumed process's file alone holds the whole
    history even when the killed one's was lost; a run that starts at step 0 starts a new W&B
    run. Scalars ``<split>/<key>`` at W&B step = training step."""

    def __init__(
        self,
        out: Path,
        config: dict[str, Any],
        *,
        project: str,
        mode: str,
        resume: bool,
        history: Sequence[dict[str, Any]] = (),
    ):
        wandb = require("wandb", "wandb", feature="train.log = [..., 'wandb']")
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
        run_id = run_id or secrets.token_hex(4)  # W&B's ids are 8 characters of [a-z0-9]
        atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(
                project=project,
                dir=str(out),
                mode=mode,
                name=out.name,
                config=config,
                id=run_id,
                resume="allow",
            )
        except Exception as e:  # wandb's own errors (no login for "online", ...): one line
            # A ValueError (ConfigError's base, which the CLI prints as one line): this module
            # sits below flatlm.lm.config, which checks train.log against TRACKERS.
            raise ValueError(
                f"train.log names 'wandb' but wandb.init failed in mode {mode!r}: "
                f'{type(e).__name__}: {e} (train.wandb_mode = "offline" needs no account)'
            ) from e
        self.pending: dict[str, float] = {}
        self.step: int | None = None
        # A resume logs the checkpoint's history first: what the killed process streamed may
        # be lost (kill -9 left its offline file at its 7-byte header), and W&B's own resumed
        # step (online; 0 offline) says which steps it already holds.
        held = int(getattr(self.run, "step", 0) or 0)
        for record in history:
            if record["step"] >= held:
                self.add(record)
        self._commit()

    def add(self, record: dict[str, Any]) -> None:
        # One W&B row per step: the train, val and sharpness records of a step go together.
        if self.step is not None and record["step"] != self.step:
            self._commit()
        self.step = record["step"]
        self.pending |= scalars(record)  # NaN too: a diverged run shows as one

    def _commit(self) -> None:
        if self.pending and self.step is not None:
            self.run.log(self.pending, step=self.step)
        self.pending = {}

    def flush(self) -> None:
        self._commit()

    def close(self, ok: bool = True) -> None:
        self._commit()
        self.run.finish(exit_code=0 if ok else 1)


# ----------------------------------------------------------------------------- the set


def check_trackers(names: Sequence[str]) -> None:
    """Before a run: every named tracker's package is installed, else the MissingExtraError
    naming the extra to install."""
    for name in names:
        error = missing_package(name)
        if error is not None:
            raise error


def make_trackers(
    names: Sequence[str],
    out: Path,
    history: Sequence[dict[str, Any]],
    *,
    config: dict[str, Any],
    start_step: int,
    resume: bool,
    rank: int = 0,
    wandb_project: str = "flatlm",
    wandb_mode: str = "offline",
) -> list[Tracker]:
    """The trackers ``names`` for a run folder: the files get the resumed ``history``; the
    streaming ones only what comes next, and only on rank 0 (the other ranks' folders are
    throwaway). A file tracker not named has its file removed: it would describe an earlier
    run."""
    check_trackers(names)
    for name, file in FILES.items():
        if name not in names:
            (out / file).unlink(missing_ok=True)
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "jsonl":
                trackers.append(JsonlTracker(out, history))
            elif name == "csv":
                trackers.append(CsvTracker(out, history))
            elif rank > 0:
                continue
            elif name == "tensorboard":
                trackers.append(TensorBoardTracker(out, start_step))
            elif name == "wandb":
                resumed = resume and start_step > 0
                wandb_run = WandbTracker(
                    out,
                    config,
                    project=wandb_project,
                    mode=wandb_mode,
                    resume=resumed,
                    history=history if resumed else (),
                )
                trackers.append(wandb_run)
            else:
                raise ValueError(f"unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
    except BaseException:
        for tracker in trackers:  # the ones already open (a TensorBoard writer's thread)
            tracker.close(ok=False)
        raise
    return trackers
