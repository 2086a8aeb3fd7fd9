"""Item 5: ``--data`` is text in the declared encoding (``--encoding``, default UTF-8), or it is
refused naming the file and the byte offset: never decoded with replacement characters."""

from __future__ import annotations

import random

import pytest

from flatlm import cli
from flatlm.lm.config import ConfigError, DataConfig, load_config
from flatlm.lm.data import corpus_fingerprint, prepare_corpus, read_text

TEXT = "The café was naïve. " * 400  # 20 lines' worth of text with two non-ASCII letters


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (TEXT.encode("latin-1"), r"not valid utf-8 text: b'\\xe9' at byte offset 7"),
        (TEXT.encode("utf-16"), r"not valid utf-8 text: b'\\xff' at byte offset 0"),
        (TEXT[:10].encode() + b"\0\1\2" + TEXT.encode(), r"binary, not text: .* byte offset 11"),
        (random.Random(0).randbytes(5000), r"not valid utf-8 text: .* at byte offset \d+"),
    ],
    ids=["latin-1", "utf-16", "nul", "random bytes"],
)
def test_what_is_not_valid_text_is_refused_naming_file_and_offset(tmp_path, raw, message):
    path = tmp_path / "data.txt"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"{path}.*{message}"):
        read_text(path)
    with pytest.raises(ValueError, match=message):
        prepare_corpus(DataConfig(corpus=str(path), tokenizer="char"), cache_dir=tmp_path / "c")


def test_a_declared_encoding_is_read_and_changes_the_cache_key(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(TEXT.encode("latin-1"))
    assert read_text(path, "latin-1") == TEXT
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(TEXT.encode("utf-16"))
    assert read_text(utf16, "utf-16") == TEXT
    latin = DataConfig(corpus=str(path), encoding="latin-1")
    assert corpus_fingerprint(latin) != corpus_fingerprint(DataConfig(corpus=str(path)))
    with pytest.raises(ConfigError, match=r"'data\.encoding': unknown text encoding 'klingon'"):
        load_config(overrides={"data.encoding": "klingon"})


def test_the_cli_refuses_latin_1_in_one_line_and_trains_with_encoding(tiny_argv, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    docs = {folder / f"{i:02d}.txt": f"Document {i}. {TEXT}" for i in range(30)}
    bad = folder / "07.txt"
    for path, text in docs.items():
        path.write_bytes(text.encode("latin-1" if path == bad else "utf-8"))
    argv = tiny_argv(tmp_path / "run", "--steps", "2", data__corpus=folder)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad} is not valid utf-8 text" in err
    assert f"byte offset {len('Document 7. The caf')}" in err and "--encoding" in err
    for path, text in docs.items():
        path.write_bytes(text.encode("latin-1"))
    assert cli.main([*argv, "--encoding", "latin-1"]) == 0


def test_a_corpus_without_text_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    argv = ["train", "--data", str(empty), "--out", str(tmp_path / "run"), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err == f"flatlm train: error: {empty} holds no text (empty or only whitespace); "
        "give --data text\n"
    )
    assert not (tmp_path / "run").exists()
