"""Process-wide settings a run borrows and gives back: torch's thread count, the stop signals."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import torch


class Flag(Protocol):
    """``threading.Event`` or a ``multiprocessing`` Event (shared with worker processes)."""

    def set(self) -> None: ...
    def is_set(self) -> bool: ...


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """``torch.set_num_threads(n)`` if ``n > 0`` (else torch's default), restored on exit: a
    process-wide setting, so leave it as we found it. Yields the thread count in effect."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def stop_on_signals(stop: Flag | None = None) -> Iterator[Flag]:
    """SIGINT/SIGTERM set ``stop`` (the caller checkpoints, starts nothing new and returns); a
    second one raises ``KeyboardInterrupt``. Off the main thread, where handlers cannot be
    installed, the flag is only yielded."""
    flag: Flag = stop if stop is not None else threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)
