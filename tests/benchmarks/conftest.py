"""A small real-text corpus for the benchmark scripts' smoke runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flatlm.lm.data import read_sotu


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """About 60 kB of State of the Union text: every split non-empty, tokenised in no time."""
    text = ""
    for _, doc in read_sotu():
        text += doc + "\n\n"
        if len(text) > 60_000:
            break
    path = tmp_path / "speeches.txt"
    path.write_text(text, encoding="utf-8")
    return path
