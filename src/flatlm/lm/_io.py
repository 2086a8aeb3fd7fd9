"""Files the workbench writes: atomic writes, and the one-owner lock of a run folder.

Every file the workbench rewrites (metrics, checkpoints, the token cache) goes through
:func:`atomic_write`, so a reader or a resume after a crash never sees half a file. A run folder
is written by one process at a time (:func:`own_folder`), which also removes the temp files that
killed writes left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

LOCK_NAME = "run.lock"


class FolderError(RuntimeError):
    """A folder the workbench must write in cannot be used; the message names it and the fix."""


class StaleLockWarning(UserWarning):
    """A run folder's lock was left by a process that no longer runs, and was taken over."""


def _temp_path(path: Path) -> Path:
    # ".NAME.*" beside NAME: what remove_temp_files recognises as a killed write's leftover.
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(
    path: Path, mode: str = "w", *, durable: bool = False, backup: Path | None = None
) -> Iterator[IO[Any]]:
    """Yield a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    ``durable`` fsyncs the file before the rename and the folder after it (checkpoints: the data
    is on disk when the name is). ``backup`` first moves an existing ``path`` there, so an
    unreadable new file (a full disk, a copy cut short) still leaves the previous one. On an
    error the temp file is removed. The file gets the permissions the umask gives any new file.
    """
    tmp = _temp_path(path)
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666
        )  # mkstemp's 0600 ignores umask
    except OSError as e:  # name the file asked for, not our temp file
        raise OSError(e.errno, e.strerror, str(path)) from None
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
        if durable:
            fsync_path(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8, newlines as given), atomically."""
    with atomic_write(path) as f:
        f.write(text)


def remove_temp_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temp files that killed atomic writes of ``folder/NAME`` left; returns them.
    Only safe while no other process writes those files: under :func:`own_folder`."""
    removed = []
    for name in names:
        for leftover in folder.glob(f".{name}.*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(leftover)
    return removed


# ----------------------------------------------------------------------------- the owner lock


@contextlib.contextmanager
def own_folder(folder: Path, temp_names: Iterable[str] = ()) -> Iterator[Path]:
    """Create ``folder`` and own it until the block ends (also on an exception): a second
    process gets a ``FolderError`` naming the owner. Temp files of killed writes of
    ``folder/NAME`` for NAME in ``temp_names`` are removed once it is ours.

    The lock is ``run.lock`` holding the owner's pid and host, with an exclusive ``flock`` on it
    for as long as the owner runs: the kernel drops the ``flock`` when the owner dies (kill -9
    included), so a lock whose ``flock`` is free and whose pid no longer runs is stale, and is
    taken over with a :class:`StaleLockWarning`.
    """
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unusable(folder, e) from e
    try:
        fd = _acquire(folder / LOCK_NAME)
    except BaseException:
        _remove_empty(made)
        raise
    ok = False
    try:
        remove_temp_files(folder, temp_names)
        yield folder
        ok = True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(folder / LOCK_NAME)  # before the flock goes: see _acquire's retry
        os.close(fd)
        if not ok:  # an error before anything was written leaves no empty folder behind
            _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this process made, innermost first, as long as they are empty."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def _unusable(folder: Path, e: OSError) -> FolderError:
    return FolderError(
        f"cannot write in {folder}: {e.strerror or e}; choose a writable folder (--out)"
    )


def _acquire(path: Path) -> int:
    """The lock file's descriptor, flock held and our pid and host written in it."""
    import fcntl  # POSIX (Linux, macOS)

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _unusable(path.parent, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise FolderError(_busy_message(path, owner, held=True)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed the file while we opened it: take the new one
    owner = _read_owner(fd)
    if owner and _running_elsewhere(owner):
        os.close(fd)
        raise FolderError(_busy_message(path, owner, held=False))
    if owner and owner.get("pid") != os.getpid():
        warnings.warn(
            f"{path.parent}: taking over the lock of process {owner.get('pid')} on "
            f"{owner.get('host')}, which is no longer running",
            StaleLockWarning,
            stacklevel=2,
        )
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    return fd


def _read_owner(fd: int) -> dict[str, Any]:
    """The pid and host a lock file names ({} if empty or unreadable: a write cut short)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _running_elsewhere(owner: dict[str, Any]) -> bool:
    """Whether the process a lock names may still run: on another host we cannot tell, so yes."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname():
        return True
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _busy_message(path: Path, owner: dict[str, Any], held: bool) -> str:
    who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
    # A held flock is proof the owner runs; a pid that runs (here or maybe on another host) is not.
    unsure = "" if held else f"; if no flatlm run uses it any more, delete {path}"
    return (
        f"{path.parent} is in use by {who}: one process per run folder; wait for it to end or "
        f"use another --out{unsure}"
    )


def safe_name(text: str) -> str:
    """``text`` as one folder name on any filesystem: every character but letters, digits and
    ``_ . = + -`` becomes ``_`` (``gasam:alpha=-1`` -> ``gasam_alpha=-1``)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)
