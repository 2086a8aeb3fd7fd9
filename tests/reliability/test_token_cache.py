"""The token cache is verified before a run reads it: its length against ``meta.json``, a
SHA-256 of every split's tokens, and every id below the vocabulary. A damaged cache is a
one-line error (exit 2) naming the file and the fix, never a run on other tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flatlm import cli
from flatlm.lm.data import CacheError, prepare_corpus


@pytest.fixture
def own_cache(tmp_path, monkeypatch, tiny_cfg):
    """A cache of this test's own (the session's is shared), built once; returns its folder."""
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path / "cache"))
    return prepare_corpus(tiny_cfg().data).directory


def _damage(directory, how: str) -> None:
    path = directory / "train.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    if how == "truncated":
        tokens[:100].tofile(path)
    elif how == "constant":
        np.full_like(tokens, 5).tofile(path)
    elif how == "id out of range":
        tokens[len(tokens) // 2] = 60_000
        tokens.tofile(path)
    elif how == "missing":
        path.unlink()
    elif how == "tokenizer changed":  # same vocabulary size, other characters
        tok = json.loads((directory / "tokenizer.json").read_text())
        tok["chars"] = tok["chars"][::-1]
        (directory / "tokenizer.json").write_text(json.dumps(tok))
    elif how == "meta unreadable":
        (directory / "meta.json").write_text('{"dtype": "uint16", "tok')


CASES = {
    "truncated": "train.bin holds 100 tokens but",
    "constant": "train.bin is damaged: its SHA-256 does not match",
    "id out of range": "train.bin is damaged: its SHA-256",
    "missing": "train.bin is missing but",
    "tokenizer changed": "tokenizer.json is damaged: its SHA-256 does not match",
    "meta unreadable": "meta.json is unreadable",
}


@pytest.mark.parametrize("how", CASES)
def test_a_damaged_token_cache_is_a_one_line_error_naming_it(
    how, own_cache, tiny_cfg, tiny_argv, tmp_path, capsys
):
    _damage(own_cache, how)
    with pytest.raises(CacheError, match=CASES[how]):
        prepare_corpus(tiny_cfg().data)
    assert cli.main(tiny_argv(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and CASES[how] in err
    assert f"delete the folder {own_cache} and run again to rebuild it" in err
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run starts


def test_an_id_out_of_range_is_refused_in_a_cache_without_checksums(own_cache, tiny_cfg):
    """A cache written before checksums: its ids are still checked against the vocabulary;
    a sound one gets its checksums added."""
    meta_path = own_cache / "meta.json"
    meta = json.loads(meta_path.read_text())
    sums = meta.pop("sha256")
    meta_path.write_text(json.dumps(meta))
    prepare_corpus(tiny_cfg().data)
    assert json.loads(meta_path.read_text())["sha256"] == sums
    meta_path.write_text(json.dumps(meta))
    _damage(own_cache, "id out of range")
    with pytest.raises(CacheError, match="holds token id 60000, not below the vocabulary of"):
        prepare_corpus(tiny_cfg().data)


def test_the_rebuilt_cache_is_the_same(own_cache, tiny_cfg):
    before = {p.name: p.read_bytes() for p in own_cache.iterdir()}
    _damage(own_cache, "constant")
    for p in own_cache.iterdir():  # the fix the error names
        p.unlink()
    own_cache.rmdir()
    prepare_corpus(tiny_cfg().data)
    assert {p.name: p.read_bytes() for p in own_cache.iterdir()} == before
