"""The reliability suite: what a run folder promises (docs/workbench.md, "Guarantees").

It reuses the workbench tests' tiny config, test corpus and private token cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lm.conftest import TINY, corpus_file, private_cache, tiny_cfg

__all__ = ["corpus_file", "private_cache", "tiny_argv", "tiny_cfg"]


@pytest.fixture
def tiny_argv(corpus_file: Path) -> Callable[..., list[str]]:
    """A factory: ``flatlm train`` arguments (after the program name) for the tiny config into
    ``out`` (None: no ``--out``); keyword overrides become ``--set`` (``train__steps=9``:
    ``--set train.steps=9``)."""

    def make(out: Path | None, *extra: str, **sets: object) -> list[str]:
        items = {**TINY, "data.corpus": corpus_file}
        items.update({k.replace("__", "."): v for k, v in sets.items()})
        argv = ["train", "--quiet", *(["--out", str(out)] if out else [])]
        for key, value in items.items():
            argv += ["--set", f"{key}={value}"]
        return [*argv, *extra]

    return make
