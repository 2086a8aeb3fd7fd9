"""Atomic file writes: every file the workbench rewrites (metrics, checkpoints, the token cache)
goes through :func:`atomic_write`, so a reader or a resume after a crash never sees half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(
    path: Path, mode: str = "w", *, durable: bool = False, backup: Path | None = None
) -> Iterator[IO[Any]]:
    """Yield a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    ``durable`` fsyncs before the rename (checkpoints: the data is on disk when the name is).
    ``backup`` first moves an existing ``path`` there, so an unreadable new file (a full disk, a
    copy cut short) still leaves the previous one. On an error the temp file is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **text) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if backup is not None and path.is_file():
            os.replace(path, backup)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8, newlines as given), atomically."""
    with atomic_write(path) as f:
        f.write(text)
