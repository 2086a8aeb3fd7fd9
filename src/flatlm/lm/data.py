"""Corpora, train/val/test splits, tokenisers and memory-mapped token files.

The pipeline is: documents -> split by document order (or by year for the bundled corpus) ->
tokeniser fitted on the training split only -> token ids written once to ``.bin`` files in a cache
directory keyed by the corpus hash and tokeniser -> ``np.memmap`` at training time, so a corpus
larger than RAM only costs disk.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import hashlib
import itertools
import json
import lzma
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flatlm.lm._io import FolderError, atomic_write, atomic_write_text
from flatlm.lm.config import DataConfig

SOTU_PATH = Path(__file__).resolve().parent.parent / "data" / "sotu.txt.xz"
# Validation and test are later periods than training, so evaluation sees a real shift in topic
# and style (the 1970s+ vocabulary of energy, computers, terrorism, ... is rare before 1970).
SOTU_SPLITS = {"train": (1790, 1969), "val": (1970, 1995), "test": (1996, 2021)}
SPLITS = ("train", "val", "test")
EOT = "<|endoftext|>"
CACHE_VERSION = "1"  # bump when the on-disk format or the splitting rules change


def cache_root() -> Path:
    """``$FLATLM_CACHE`` or ``~/.cache/flatlm``."""
    return Path(os.environ.get("FLATLM_CACHE") or Path.home() / ".cache" / "flatlm")


# ----------------------------------------------------------------------------- documents


@dataclass
class Piece:
    """A run of text; ``ends_doc`` says whether an end-of-text token follows it."""

    text: str
    ends_doc: bool = True


def read_sotu() -> list[tuple[int, str]]:
    """The bundled State of the Union corpus as (year, text) in chronological order."""
    with lzma.open(SOTU_PATH, "rt", encoding="utf-8") as f:
        raw = f.read()
    docs = re.findall(r"<doc year=(\d+)[^>]*>(.*?)</doc>", raw, flags=re.S)
    return [(int(year), text.strip()) for year, text in docs]


def sotu_splits() -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {s: [] for s in SPLITS}
    for year, text in read_sotu():
        for split, (lo, hi) in SOTU_SPLITS.items():
            if lo <= year <= hi:
                out[split].append(Piece(text))
    return out


def _user_files(path: Path, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Path]:
    """A file, or a folder's files (not hidden ones) filtered by the ``include``/``exclude``
    globs (``data.include``/``data.exclude``: a glob matches a file's name or its path in the
    folder)."""
    if path.is_file():
        return [path]
    if path.is_dir():

        def matches(p: Path, patterns: Sequence[str]) -> bool:
            rel = p.relative_to(path).as_posix()
            return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(p.name, g) for g in patterns)

        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"data folder {path} contains no files")
        kept = [
            p
            for p in files
            if (not include or matches(p, include)) and not (exclude and matches(p, exclude))
        ]
        if not kept:
            raise ValueError(
                f"data folder {path}: none of its {len(files)} files is left by --include "
                f"{list(include)} / --exclude {list(exclude)}"
            )
        return kept
    raise FileNotFoundError(f"data path not found: {path}")


def _cut_points(text: str, size: int) -> list[int]:
    """Cut positions roughly every ``size`` chars, preferring blank lines, then newlines, spaces."""
    cuts, start = [], 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, lo, hi)
            if cut >= 0:
                cut += len(sep)
                break
        cut = cut if cut > start else hi
        cuts.append(cut)
        start = cut
    return cuts


def split_documents(
    docs: list[str], val_fraction: float, test_fraction: float
) -> dict[str, list[Piece]]:
    """Split documents in order: first (1 - val - test) of the characters train, then val, test.

    Documents longer than 1/50 of the corpus (e.g. a single-file corpus) are cut into pieces at
    paragraph boundaries first, so every split gets text whatever the file layout.
    """
    total = sum(len(d) for d in docs)
    if total == 0:
        raise ValueError("the corpus is empty")
    size = max(total // 50, 1000)
    pieces: list[Piece] = []
    for doc in docs:
        bounds = [0, *_cut_points(doc, size), len(doc)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            pieces.append(Piece(doc[a:b], ends_doc=i == len(bounds) - 2))
    cut_val, cut_test = (1 - val_fraction - test_fraction) * total, (1 - test_fraction) * total
    out: dict[str, list[Piece]] = {s: [] for s in SPLITS}
    pos = 0
    for p in pieces:
        mid = pos + len(p.text) / 2
        out["train" if mid < cut_val else "val" if mid < cut_test else "test"].append(p)
        pos += len(p.text)
    return out


# The first bytes of files that are often found beside text and are not text.
BINARY_MAGIC = {
    b"\x1f\x8b": "gzip-compressed data",
    b"BZh": "bzip2-compressed data",
    b"\xfd7zXZ\x00": "xz-compressed data",
    b"\x28\xb5\x2f\xfd": "zstd-compressed data",
    b"PK\x03\x04": "a zip archive",
    b"%PDF": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
}


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A file's text; bytes that are not valid ``encoding`` and binary content (a NUL
    character) are a ValueError naming the file and the byte offset, never replaced."""
    raw = path.read_bytes()
    leave_out = f"leave it out of a --data folder with --exclude '{path.name}'"
    kind = next((k for magic, k in BINARY_MAGIC.items() if raw.startswith(magic)), None)
    if kind is not None:
        fix = "decompress it first" if "compressed" in kind or "archive" in kind else "remove it"
        raise ValueError(f"{path} is {kind}, not text: {fix}, or {leave_out}")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        bad = f"{path} is not valid {encoding} text: {raw[e.start : e.end]!r} at byte offset {e.start}"
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise ValueError(f"{bad}; it starts like UTF-16 text: pass --encoding utf-16") from None
        if b"\0" in raw:  # no text in a one-byte encoding or UTF-8 has NUL bytes
            raise ValueError(
                f"{bad}, and it holds NUL bytes: binary, not text; {leave_out}"
            ) from None
        raise ValueError(
            f"{bad}; if it is text in another encoding, pass --encoding NAME (e.g. latin-1, "
            f"utf-16); if it is not text, {leave_out}"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        offset = len(text[:nul].encode(encoding))
        raise ValueError(
            f"{path} is binary, not text: a NUL character at byte offset {offset}; "
            f"give --data text files only ({leave_out})"
        )
    return text


def user_splits(
    path: str | Path,
    val_fraction: float,
    test_fraction: float,
    encoding: str = "utf-8",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> dict[str, list[Piece]]:
    """A file or folder of text in ``encoding``, one document per file, split by document order."""
    files = _user_files(Path(path), include, exclude)
    docs = [read_text(f, encoding) for f in files]
    docs = [d.replace("\r\n", "\n").strip() for d in docs]
    if not any(docs):
        raise ValueError(f"{path} holds no text (empty or only whitespace); give --data text")
    return split_documents([d for d in docs if d], val_fraction, test_fraction)


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Hash of the corpus bytes and the splitting rule: the cache key for everything derived."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    if cfg.corpus == "sotu":
        files, root = [SOTU_PATH], SOTU_PATH.parent
        h.update(repr(SOTU_SPLITS).encode())
    else:
        root = Path(cfg.corpus)
        files = _user_files(root, cfg.include, cfg.exclude)
        root = root if root.is_dir() else root.parent
        h.update(f"{cfg.val_fraction}/{cfg.test_fraction}".encode())
        encoding = codecs.lookup(cfg.encoding).name
        if encoding != "utf-8":  # the same bytes are other text (UTF-8 keeps the older keys)
            h.update(f"encoding={encoding}".encode())
    for f in files:
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]


def load_splits(cfg: DataConfig) -> dict[str, list[Piece]]:
    if cfg.corpus == "sotu":
        return sotu_splits()
    return user_splits(
        cfg.corpus, cfg.val_fraction, cfg.test_fraction, cfg.encoding, cfg.include, cfg.exclude
    )


# ----------------------------------------------------------------------------- tokenisers


class CharTokenizer:
    """Characters seen in the training split; id 0 is end-of-text, id 1 stands for unseen chars."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i + 2 for i, c in enumerate(chars)}
        self.eot_id, self.unk_id = 0, 1

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(c, 1) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i - 2] if i >= 2 else "" for i in map(int, ids))

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"type": "char", "chars": self.chars}))


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from ``tokenizers``: any UTF-8 text round-trips exactly."""

    def __init__(self, tok):
        self.tok = tok
        self.eot_id = tok.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.tok.to_str())


Tokenizer = CharTokenizer | BPETokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    if data.get("type") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(text))


# ----------------------------------------------------------------------------- cache


def _write_tokens(path: Path, tok: Tokenizer, pieces: list[Piece], dtype: type) -> tuple[int, str]:
    """Stream token ids to ``path`` piece by piece (never the whole split in memory); returns
    their number and the SHA-256 of the file."""
    n, sha = 0, hashlib.sha256()
    with atomic_write(path, "wb") as f:
        for i in range(0, len(pieces), 64):
            chunk = pieces[i : i + 64]
            for p, ids in zip(chunk, tok.encode_batch([p.text for p in chunk]), strict=True):
                if p.ends_doc:
                    ids = [*ids, tok.eot_id]
                data = np.asarray(ids, dtype=dtype).tobytes()
                f.write(data)
                sha.update(data)
                n += len(ids)
    return n, sha.hexdigest()


class CacheError(ValueError):
    """A token cache that does not hold what its ``meta.json`` says; the message names the
    file and the fix (delete the folder: the next run rebuilds it)."""


def _sha256_file(path: Path) -> str:
    return _scan_tokens(path, None)[0]


def _scan_tokens(path: Path, dtype: np.dtype | None) -> tuple[str, int]:
    """The SHA-256 of a token file and its largest id (-1 if empty or no ``dtype``), in one
    pass."""
    sha, top = hashlib.sha256(), -1
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            if dtype is None:
                continue
            usable = len(block) - len(block) % dtype.itemsize
            if usable:
                top = max(top, int(np.frombuffer(block[:usable], dtype=dtype).max()))
    return sha.hexdigest(), top


def verify_cache(directory: Path, meta: dict, vocab_size: int) -> dict:
    """Check every split's token file against ``meta.json`` before a run reads it: its length,
    its SHA-256 (caches written before checksums get theirs now, added to ``meta.json``) and
    every id below the tokeniser's vocabulary. Returns the meta (with the checksums)."""
    fix = f"delete the folder {directory} and run again to rebuild it"
    dtype = np.dtype(meta["dtype"])
    if meta.get("vocab_size") != vocab_size:
        raise CacheError(
            f"token cache {directory / 'tokenizer.json'} has {vocab_size} tokens but "
            f"{directory / 'meta.json'} says {meta.get('vocab_size')}: the cache is damaged; {fix}"
        )
    sums = dict(meta.get("sha256") or {})
    for split in SPLITS:
        path, tokens = directory / f"{split}.bin", int(meta["tokens"][split])
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * dtype.itemsize:
            held = "is missing" if size is None else f"holds {size // dtype.itemsize} tokens"
            raise CacheError(
                f"token cache {path} {held} but {directory / 'meta.json'} says {tokens}: the "
                f"cache is damaged or was cut short; {fix}"
            )
        digest, top = _scan_tokens(path, dtype)
        if split in sums and sums[split] != digest:
            raise CacheError(
                f"token cache {path} is damaged: its SHA-256 does not match the one in "
                f"{directory / 'meta.json'}; {fix}"
            )
        if top >= vocab_size:
            raise CacheError(
                f"token cache {path} holds token id {top}, not below the vocabulary of "
                f"{vocab_size}: the cache is damaged; {fix}"
            )
        sums[split] = digest
    tokenizer = directory / "tokenizer.json"  # the same ids must decode to the same text
    digest = _sha256_file(tokenizer)
    if sums.setdefault("tokenizer", digest) != digest:
        raise CacheError(
            f"token cache {tokenizer} is damaged: its SHA-256 does not match the one in "
            f"{directory / 'meta.json'}; {fix}"
        )
    if sums != meta.get("sha256"):  # an older cache, now verified as far as it can be
        meta = meta | {"sha256": sums}
        with contextlib.suppress(OSError):  # a read-only cache stays usable
            atomic_write_text(directory / "meta.json", json.dumps(meta, indent=1))
    return meta


@dataclass
class Corpus:
    """Tokenised splits as read-only memmaps, plus the tokeniser that made them."""

    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]
    fingerprint: str
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_corpus(cfg: DataConfig, cache_dir: str | Path | None = None) -> Corpus:
    """Tokenise the corpus once into the cache (or reuse it) and memory-map the splits."""
    fp = corpus_fingerprint(cfg)
    spec = "char" if cfg.tokenizer == "char" else f"bpe{cfg.vocab_size}"
    directory = Path(cache_dir or cache_root()) / fp / spec
    meta_path = directory / "meta.json"
    if not meta_path.is_file():  # meta.json is written last: its presence means complete
        splits = load_splits(cfg)
        train_texts = (p.text for p in splits["train"])
        with _cache_errors(directory):
            directory.mkdir(parents=True, exist_ok=True)
            what = "characters" if cfg.tokenizer == "char" else f"a {cfg.vocab_size}-token BPE"
            print(  # once the data and the cache are known good: errors stay one line
                f"tokenising {cfg.corpus} once: training {what} on the training split and "
                f"writing the token cache under {directory} (seconds to a minute; reused after)",
                file=sys.stderr,
                flush=True,
            )
            if cfg.tokenizer == "char":
                tok: Tokenizer = CharTokenizer.train(train_texts)
            else:
                tok = BPETokenizer.train(train_texts, cfg.vocab_size)
            tok.save(directory / "tokenizer.json")
            dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
            written = {
                s: _write_tokens(directory / f"{s}.bin", tok, splits[s], dtype) for s in SPLITS
            }
            sizes = {s: n for s, (n, _) in written.items()}
            meta = {"dtype": np.dtype(dtype).name, "tokens": sizes, "vocab_size": tok.vocab_size}
            meta |= {"corpus": cfg.corpus, "fingerprint": fp}
            meta["sha256"] = {s: digest for s, (_, digest) in written.items()}
            meta["sha256"]["tokenizer"] = _sha256_file(directory / "tokenizer.json")
            atomic_write_text(meta_path, json.dumps(meta, indent=1))
    meta, tok = _read_cache(directory)
    meta = verify_cache(directory, meta, tok.vocab_size)
    arrays = {}
    for s in SPLITS:
        n = meta["tokens"][s]
        arrays[s] = (
            np.memmap(directory / f"{s}.bin", dtype=meta["dtype"], mode="r")
            if n
            else np.zeros(0, dtype=meta["dtype"])
        )
    return Corpus(tok, arrays, fp, directory)


def _read_cache(directory: Path) -> tuple[dict, Tokenizer]:
    """``meta.json`` and the tokeniser of a cache folder, or a CacheError naming the file."""
    fix = f"delete the folder {directory} and run again to rebuild it"
    for name in ("meta.json", "tokenizer.json"):
        path = directory / name
        try:
            if name == "meta.json":
                meta = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(meta, dict) or not {"dtype", "tokens"} <= set(meta):
                    raise ValueError("not a flatlm cache meta.json")
                np.dtype(meta["dtype"])
                [int(meta["tokens"][s]) for s in SPLITS]
            else:
                tok = load_tokenizer(path)
        except Exception as e:
            raise CacheError(
                f"token cache {path} is unreadable ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); {fix}"
            ) from e
    return meta, tok


@contextlib.contextmanager
def _cache_errors(directory: Path) -> Iterator[None]:
    """An unwritable cache (read-only, or a file where a folder should be) as one clear error."""
    try:
        yield
    except OSError as e:
        raise FolderError(
            f"cannot write the token cache in {directory}: {e.strerror or e}; set FLATLM_CACHE "
            "to a writable folder"
        ) from e


# ----------------------------------------------------------------------------- batches


def train_split(corpus: Corpus, cfg: DataConfig) -> np.ndarray:
    """The training tokens a run samples from: the last ``data.train_tokens`` (0 = all).

    The last tokens are the text nearest the (later) validation period, so a limited split adds
    repetition (over-fitting) without adding more distribution shift.
    """
    data = corpus.splits["train"]
    n = cfg.train_tokens
    return data[len(data) - n :] if 0 < n < len(data) else data


def _check_length(data: np.ndarray, block_size: int, split: str) -> None:
    if len(data) < block_size + 1:
        raise ValueError(
            f"the {split} split has {len(data)} tokens, fewer than block_size+1 = {block_size + 1};"
            " use a larger corpus or a smaller model.block_size"
        )


def check_windows_fit(splits: dict[str, np.ndarray], block_size: int) -> None:
    """Every split holds a window of ``block_size + 1`` tokens (a ValueError naming the split
    and the fix otherwise): checked before a model of that context length is built."""
    for split, data in splits.items():
        _check_length(data, block_size, split)


def _windows(data: np.ndarray, starts: Iterable[int], block_size: int):
    idx = np.stack([np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in starts])
    t = torch.from_numpy(idx)
    return t[:, :-1], t[:, 1:]


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows; the sampling generator is separate from the model's RNG (resumable)."""
    _check_length(data, block_size, "training")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    return _windows(data, starts, block_size)


def eval_batches(
    data: np.ndarray, n_batches: int, batch_size: int, block_size: int, split: str = "eval"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, evenly spaced windows: every method and seed is scored on the same text."""
    _check_length(data, block_size, split)
    starts = np.linspace(0, len(data) - block_size - 1, n_batches * batch_size).astype(np.int64)
    for b in range(n_batches):
        yield _windows(data, starts[b * batch_size : (b + 1) * batch_size].tolist(), block_size)
