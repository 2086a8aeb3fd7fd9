"""Data pipeline: splits, tokenisers, cache and batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlm.lm.config import DataConfig
from flatlm.lm.data import (
    SOTU_SPLITS,
    BPETokenizer,
    CharTokenizer,
    eval_batches,
    get_batch,
    prepare_corpus,
    read_sotu,
    sotu_splits,
    split_documents,
    user_splits,
)

SAMPLES = [
    "Fellow-Citizens of the Senate and House of Representatives:",
    "naïve café — “quotes”, tabs\tand\nnewlines; emoji 🇺🇸 and 数字 2021!",
    "",
    "  leading and trailing spaces  ",
]


def test_sotu_splits_are_later_periods_and_disjoint():
    docs = read_sotu()
    assert len(docs) == 233
    years = {s: [y for y, _ in docs if lo <= y <= hi] for s, (lo, hi) in SOTU_SPLITS.items()}
    assert max(years["train"]) < min(years["val"]) <= max(years["val"]) < min(years["test"])
    splits = sotu_splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [181, 26, 26]
    texts = {s: {p.text for p in splits[s]} for s in splits}
    assert not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    assert not texts["train"] & texts["test"]


def test_single_document_is_cut_in_order_and_nothing_is_lost():
    doc = "\n\n".join(f"Paragraph {i} " + "word " * (i % 7 + 20) for i in range(400))
    splits = split_documents([doc], 0.1, 0.1)
    parts = {s: "".join(p.text for p in splits[s]) for s in splits}
    assert parts["train"] + parts["val"] + parts["test"] == doc
    total = len(doc)
    assert abs(len(parts["val"]) / total - 0.1) < 0.03
    assert abs(len(parts["test"]) / total - 0.1) < 0.03
    # one document: only its very last piece is followed by an end-of-text token
    assert [p.ends_doc for s in splits for p in splits[s]].count(True) == 1


def test_folder_of_documents_splits_by_file_order(tmp_path):
    for i in range(20):
        (tmp_path / f"{i:02d}.txt").write_text(f"document {i} " * 50, encoding="utf-8")
    (tmp_path / ".hidden").write_text("never read")
    splits = user_splits(tmp_path, 0.1, 0.1)
    ids = {s: [int(p.text.split()[1]) for p in splits[s]] for s in splits}
    assert ids == {"train": list(range(16)), "val": [16, 17], "test": [18, 19]}
    assert all(p.ends_doc for s in splits for p in splits[s])


def test_char_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer.train(["abc cab", "ba!"])
    assert tok.vocab_size == 4 + 2 + 1  # a b c space ! + eot + unk
    assert tok.decode(tok.encode("cab ba!")) == "cab ba!"
    assert tok.encode("z") == [tok.unk_id]
    assert tok.decode([tok.eot_id, *tok.encode("ab")]) == "ab"


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip_any_utf8(text):
    tok = BPETokenizer.train(["the state of the union is strong " * 50], vocab_size=300)
    assert tok.vocab_size <= 300
    assert tok.decode(tok.encode(text)) == text


def test_prepare_corpus_caches_and_memmaps(corpus_file, tmp_path):
    cfg = DataConfig(corpus=str(corpus_file), tokenizer="char")
    corpus = prepare_corpus(cfg, cache_dir=tmp_path)
    assert isinstance(corpus.splits["train"], np.memmap)
    assert corpus.splits["train"].dtype == np.uint16
    splits = user_splits(corpus_file, 0.1, 0.1)
    for name in ("train", "val", "test"):  # the .bin holds exactly the split's text
        decoded = corpus.tokenizer.decode(corpus.splits[name])
        assert decoded == "".join(p.text for p in splits[name])
    n = len(corpus.splits["train"]) + len(corpus.splits["val"]) + len(corpus.splits["test"])
    assert n == len(corpus_file.read_text(encoding="utf-8").strip()) + 1  # + one end-of-text
    meta = corpus.directory / "meta.json"
    mtime = meta.stat().st_mtime_ns
    again = prepare_corpus(cfg, cache_dir=tmp_path)
    assert meta.stat().st_mtime_ns == mtime and again.directory == corpus.directory
    bpe = prepare_corpus(DataConfig(corpus=str(corpus_file), vocab_size=512), cache_dir=tmp_path)
    assert bpe.directory.parent == corpus.directory.parent and bpe.directory.name == "bpe512"
    assert bpe.vocab_size == 512
    assert len(bpe.splits["train"]) < len(corpus.splits["train"]) / 2  # BPE compresses


def test_batches_shift_and_determinism(corpus_file):
    corpus = prepare_corpus(DataConfig(corpus=str(corpus_file), tokenizer="char"))
    data = corpus.splits["train"]
    x1, y1 = get_batch(data, 4, 16, torch.Generator().manual_seed(3))
    x2, y2 = get_batch(data, 4, 16, torch.Generator().manual_seed(3))
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    a = [x for x, _ in eval_batches(corpus.splits["val"], 3, 4, 16)]
    b = [x for x, _ in eval_batches(corpus.splits["val"], 3, 4, 16)]
    assert len(a) == 3 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_too_short_split_is_a_clear_error():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(10, dtype=np.uint16), 2, 16, torch.Generator())
