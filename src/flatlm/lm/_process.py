"""Process-wide settings a run borrows and gives back (torch's thread count, the stop signals),
and the one pool of worker processes every sweep runs (:func:`run_workers`).

Threads: :func:`default_threads` is the policy for ``train.threads = 0`` (one count per process
that fits the machine, the other jobs and the load already on it). Signals: a run checkpoints
and returns on the first SIGINT/SIGTERM (:func:`stop_on_signals`); a sweep's worker processes
share their parent's flag instead (:func:`join_sweep`), so one interrupt delivered to every
process at once (Ctrl-C, ``timeout -s INT``, a scheduler) is still one clean stop.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch


class Flag(Protocol):
    """``threading.Event``, :class:`SharedFlag` or a ``multiprocessing`` Event."""

    def set(self) -> None: ...
    def is_set(self) -> bool: ...


class SharedFlag:
    """A stop flag in shared memory, for a parent and its spawned workers (pass it as a
    ``Process`` argument). It takes no lock, so a signal handler can set it while the same
    thread is reading it (a ``multiprocessing.Event`` could deadlock there)."""

    def __init__(self, ctx: Any) -> None:
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)


# ----------------------------------------------------------------------------- threads


class ThreadChoice(NamedTuple):
    """How many torch threads each of ``jobs`` processes gets, and a sentence saying why."""

    threads: int
    reason: str


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads(
    jobs: int = 1,
    *,
    cpus: int | None = None,
    load: float | None = None,
    torch_default: int | None = None,
) -> ThreadChoice:
    """The thread count for ``train.threads = 0``: the usable cores not already busy (the 1-minute
    load average), shared by ``jobs`` processes, at least 1 and at most torch's own default.

    torch's default (one thread per physical core) oversubscribes a busy machine: spin-waiting
    OpenMP threads then lose their cores to other processes (a micro GPT ran 1,664 ms/step with
    2 threads on a busy 2-core machine, ~600 with 1). ``cpus``, ``load`` and ``torch_default``
    are read from the machine unless given (tests pass them).
    """
    jobs = max(1, jobs)
    cpus = usable_cpus() if cpus is None else max(1, cpus)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    torch_default = torch.get_num_threads() if torch_default is None else torch_default
    share = cpus // jobs
    free = int((cpus - load) / jobs + 0.5)  # the idle cores' share, rounded
    threads = max(1, min(share, free, torch_default))
    reason = (
        f"{threads} torch thread{'s' if threads > 1 else ''} per run (train.threads=0: "
        f"{cpus} usable cores, load {load:.1f}, {jobs} job{'s' if jobs > 1 else ''} at a time; "
        "set train.threads to choose)"
    )
    return ThreadChoice(threads, reason)


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


# ----------------------------------------------------------------------------- signals

# A signal this soon after the first is the same interrupt delivered twice (``timeout -s INT``
# sends it to its child and then to the whole process group; schedulers signal every process).
SAME_INTERRUPT_S = 0.5

# The flag of the enclosing stop_on_signals, or in a sweep worker the parent's (join_sweep):
# a nested stop_on_signals() shares it instead of installing handlers of its own.
_ACTIVE: list[Flag] = []


@contextlib.contextmanager
def stop_on_signals(stop: Flag | None = None) -> Iterator[Flag]:
    """SIGINT/SIGTERM set ``stop`` (the caller checkpoints, starts nothing new and returns); a
    second one raises ``KeyboardInterrupt``, unless it comes within ``SAME_INTERRUPT_S`` of the
    first (then it is the same interrupt, delivered twice).

    Inside another ``stop_on_signals`` or a sweep worker, ``stop_on_signals()`` yields the
    enclosing flag and installs nothing. Off the main thread, where handlers cannot be
    installed, the flag is only yielded."""
    if stop is None and _ACTIVE:
        yield _ACTIVE[-1]
        return
    flag: Flag = stop if stop is not None else threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
            flag.set()
        elif now - first[0] > SAME_INTERRUPT_S:
            raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    _ACTIVE.append(flag)
    try:
        yield flag
    finally:
        _ACTIVE.remove(flag)
        for s, h in old.items():
            signal.signal(s, h)


def join_sweep(stop: Flag) -> None:
    """In a sweep's worker process: SIGINT and SIGTERM only set the parent's ``stop``, and every
    later ``stop_on_signals()`` (the training loop's) yields it. The worker never raises on a
    signal: the parent alone decides to abort, and then kills its workers."""

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
    _ACTIVE[:] = [stop]


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while processes are spawned: a child started with SIGINT ignored keeps it
    ignored until it installs a handler, so an interrupt during its imports prints no
    KeyboardInterrupt traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# ----------------------------------------------------------------------------- worker processes


def _worker_main(target: Callable[..., None], args: tuple[Any, ...], stop: Flag) -> None:
    join_sweep(stop)  # signals only set the shared flag; the parent decides to abort
    target(*args, stop)


def run_workers(
    target: Callable[..., None],
    args: tuple[Any, ...],
    jobs: int,
    stop: Flag,
    *,
    poll: Callable[[], None],
    on_death: Callable[[int, int], None] | None = None,
    poll_s: float = 0.5,
) -> list[int | None]:
    """Run ``target(*args, stop)`` in ``jobs`` spawned processes (each takes its work from a
    queue, :mod:`flatlm.lm.study`) until all return; ``poll()`` every ``poll_s`` seconds (the
    parent's progress). A process that ends with a non-zero exit code (killed, or crashed) is
    passed to ``on_death(pid, exitcode)`` at once; the others go on. KeyboardInterrupt (a
    second interrupt) kills them all and is raised. Returns the exit codes."""
    ctx = mp.get_context("spawn")
    with sigint_ignored():  # workers start ignoring SIGINT until join_sweep
        procs = [
            ctx.Process(target=_worker_main, args=(target, args, stop), daemon=True)
            for _ in range(jobs)
        ]
        for p in procs:
            p.start()
    dead: set[int] = set()

    def bury() -> None:
        for p in procs:
            if p.pid not in dead and p.exitcode:
                dead.add(p.pid)  # type: ignore[arg-type]
                if on_death is not None:
                    on_death(p.pid, p.exitcode)  # type: ignore[arg-type]

    try:
        while alive := [p for p in procs if p.is_alive()]:
            wait_for([p.sentinel for p in alive], poll_s)
            bury()
            poll()
        bury()
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.kill()
        raise
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs]
