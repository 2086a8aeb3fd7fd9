"""Shared fixtures: a small real-text corpus file and a private cache dir for every test."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlm.lm.config import RunConfig, load_config
from flatlm.lm.data import read_sotu

# Small enough that a run takes a fraction of a second, big enough for BPE and all three splits.
TINY: dict[str, object] = {
    "model.size": "micro",
    "model.block_size": 16,
    "data.tokenizer": "char",
    "train.steps": 6,
    "train.batch_size": 4,
    "train.warmup_steps": 2,
    "train.eval_every": 2,
    "train.eval_batches": 2,
    "train.test_batches": 2,
    "train.log_every": 1,
    "train.threads": 1,
}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 120 kB of State of the Union text as a plain user file (blank-line paragraphs)."""
    path = tmp_path_factory.mktemp("corpus") / "speeches.txt"
    text, docs = "", read_sotu()
    for _, doc in docs:
        text += doc.replace(". ", ".\n\n", 3) + "\n\n"
        if len(text) > 120_000:
            break
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """One cache for the session (tokenised corpora are reused), never the user's ~/.cache."""
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path_factory.getbasetemp() / "flatlm-cache"))


@pytest.fixture
def tiny_cfg(corpus_file: Path):
    """A factory: the tiny config on the test corpus, with extra overrides."""

    def make(**overrides: object) -> RunConfig:
        items = {**TINY, "data.corpus": str(corpus_file)}
        items.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config(overrides=items)

    return make
