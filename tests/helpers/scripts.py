"""Load a script under benchmarks/ as a module (they are scripts, not package modules)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py``, registered in sys.modules (dataclasses need that)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# A run small enough for a subprocess test: a micro char-level model, one thread, a checkpoint
# every 5 steps (so a signal or a kill finds one to resume from).
TINY_RUN = {
    "model.size": "micro",
    "model.block_size": "16",
    "data.tokenizer": "char",
    "train.batch_size": "4",
    "train.eval_every": "0",
    "train.eval_batches": "1",
    "train.test_batches": "1",
    "train.threads": "1",
    "train.checkpoint_every": "5",
}


def tiny_cli(command: str, corpus: Path, *args: str, **sets: str) -> list[str]:
    """argv of ``python -m flatlm.cli COMMAND ARGS`` on ``corpus`` at TINY_RUN scale; ``sets``
    are further ``--set`` overrides (dots written as ``__``: ``optim__method="sam"``)."""
    overrides = TINY_RUN | {"data.corpus": str(corpus)}
    overrides |= {key.replace("__", "."): value for key, value in sets.items()}
    argv = [sys.executable, "-m", "flatlm.cli", command, *args]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv
