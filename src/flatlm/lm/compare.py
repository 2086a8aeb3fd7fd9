"""Run one config under several methods and seeds (the sweep behind ``flatlm compare``).

Every (method, seed) trains into ``runs/<method>-s<seed>/`` of the comparison folder
(:func:`flatlm.lm.report.run_dir`), one at a time in this process or ``jobs`` at a time in
spawned worker processes, which take them from a study queue (:mod:`flatlm.lm.study`, the queue
of ``flatlm tune`` and ``compare --tune/--storage``; :func:`_run_queued`). With ``resume`` a finished run is reused and an interrupted one
continued, but only if it was made with the same settings. The report
(:func:`flatlm.lm.report.write_report`) is written at the end.

Progress goes to stderr (nothing with ``quiet``): a header saying what runs where and with how
many torch threads, one line per finished run, and on a terminal a live bar (runs done, the
running runs' steps, an ETA) under ``jobs > 1``.

Interrupts: the first SIGINT/SIGTERM, whether it reaches only this process or every process of
the group at once (Ctrl-C, ``timeout -s INT``, a scheduler), sets one stop flag shared with the
workers: running runs finish their step, write a checkpoint and return "interrupted", no new run
starts, and the comparison returns with those runs under ``missing`` (``--resume`` continues
them). An interrupt more than ``SAME_INTERRUPT_S`` after the first aborts: the workers are
killed (their last periodic checkpoints stay) and the comparison returns ``aborted``.

Under ``jobs > 1`` the runs' step times include contention, so after the sweep each method is
also timed alone for a few steps (:func:`probe_step_times`, ``step_time_probe.json``): the
report's cost column.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import multiprocessing as mp
import os
import pickle
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flatlm.lm._io import FolderError, atomic_write_text, own_folder
from flatlm.lm._process import (
    Flag,
    SharedFlag,
    default_threads,
    run_workers,
    stop_on_signals,
    torch_threads,
)
from flatlm.lm.checkpoint import CheckpointError, checkpoint_path, has_checkpoint, verify_checkpoint
from flatlm.lm.config import (
    ConfigError,
    RunConfig,
    check_device_present,
    check_threads_present,
    config_from_dict,
)
from flatlm.lm.data import prepare_corpus
from flatlm.lm.report import PROBE_FILE, read_record, run_dir, settings_apart, write_report
from flatlm.lm.train import refuse_to_overwrite, train
from flatlm.optim.registry import method_info

# A run's result.json status that --resume continues; any other status is a finished outcome
# ("completed", "diverged", ...), reused as it is.
UNFINISHED = frozenset({"interrupted", "stopped", "not started"})
POLL_S = 0.5  # how often the parent looks at the running runs' metrics files
PROBE_STEPS, PROBE_ROUNDS, PROBE_BUDGET_S = 8, 3, 60.0
QUEUE_FILE = "queue.journal"  # the comparison's run queue while it runs (flatlm.lm.study)
QUEUE = "compare/runs"


@dataclass
class Task:
    """One (method, seed) run of the sweep, as handed to a worker (picklable)."""

    cfg: dict[str, Any]
    out: str
    quiet: bool
    resume: bool
    method: str
    seed: int
    steps: int
    prior_step: int = 0  # steps done before this sweep (a resumed or reused run)

    @property
    def name(self) -> str:
        return f"{self.method} s{self.seed}"


def _finished(result: dict[str, Any]) -> bool:
    """A run that ended for good (completed, diverged, ...), not one --resume would continue."""
    status = result.get("status")
    return status is not None and status not in UNFINISHED


def _run(task: Task, stop: Flag | None = None) -> dict[str, Any]:
    """One training run, or the finished run already there under ``resume``."""
    if stop is not None and stop.is_set():
        return {"status": "not started"}
    cfg = config_from_dict(task.cfg)
    out = Path(task.out)
    resume = False
    if task.resume:
        _check_same_run(out, task.cfg)
        result = _result(out)
        if _finished(result) and result.get("steps") == cfg.train.steps:
            return result | {"reused": True}
        resume = has_checkpoint(out)  # either kind, the latest or the previous one
    return train(cfg, out, resume=resume, quiet=task.quiet)


def _check_same_run(out: Path, wanted: dict[str, Any]) -> None:
    """Refuse to resume (or reuse) a run made with other settings, naming them: otherwise a
    changed config under ``--resume`` would silently keep the old runs. A resumed comparison may
    differ only in what does not change what a run computes (not in train.steps, which a single
    run may extend: finished runs are reused as they are)."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:  # through the config class: a key added since the folder was made is at its default
        apart = settings_apart(read_record(path), wanted)
    except ConfigError as e:  # written by another flatlm version, or edited
        raise ConfigError(f"{path} cannot be read as a run config: {e}") from None
    diffs = [f"{key} = {was!r} there, {value!r} now" for key, was, value in apart]
    if diffs:
        raise ValueError(
            f"cannot resume {out}: it was run with other settings ({'; '.join(diffs)}); "
            "use another --out, or drop --resume to start the comparison afresh"
        )


def _result(run: Path) -> dict[str, Any]:
    """A run dir's ``result.json`` ({} before the run has ended once)."""
    path = run / "result.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _last_step(run: Path) -> int:
    """The step of the last record in a run's ``metrics.jsonl`` (0 if none yet). The file is
    rewritten atomically at every validation and checkpoint, so this lags by at most
    ``train.eval_every`` steps."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return int(json.loads(next(x for x in reversed(lines) if x.strip()))["step"])
    except (OSError, ValueError, KeyError, StopIteration):
        return 0


# ----------------------------------------------------------------------------- the sweep


def compare(
    cfg: RunConfig,
    out_dir: str | Path,
    methods: list[str],
    seeds: list[int],
    *,
    jobs: int = 1,
    quiet: bool = False,
    resume: bool = False,
    probe: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Train every (method, seed) with otherwise identical settings; returns the report
    (``summary``, ``table``, ``plots``, ``files``) plus ``missing`` (the run folders --resume
    would continue), ``failed`` ("<method> s<seed>: why" of each run whose worker process died),
    ``interrupted`` (an interrupt stopped the sweep) and ``aborted`` (a second interrupt killed
    the runs).

    The comparison folder is this process's until the call returns (its ``run.lock``, as a
    run folder's): a second comparison into it gets a ``FolderError``. Without ``resume`` a
    folder holding runs is refused; with it, a finished run is reused only once its
    checkpoint is verified.

    ``probe`` (with ``jobs > 1``) times each method alone after the sweep for the report's
    ms/step; ``stream`` receives the progress (default stderr; nothing with ``quiet``)."""
    check_device_present(cfg.train.device)
    check_threads_present(cfg.train.threads)
    out = Path(out_dir)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 owns the folder
        return _compare(cfg, out, methods, seeds, jobs, quiet, resume, probe, stream)
    with own_folder(out, ("compare.json", PROBE_FILE, "results.md", "results.json")):
        _check_folder_runs(cfg, out, methods, seeds, resume)
        return _compare(cfg, out, methods, seeds, jobs, quiet, resume, probe, stream)


def _check_folder_runs(
    cfg: RunConfig, out: Path, methods: list[str], seeds: list[int], resume: bool
) -> None:
    """Before any run: without ``resume`` no run folder may hold a run (it would be replaced);
    with it, every finished run to be reused has a checkpoint that verifies (as
    ``flatlm train --resume`` would check it)."""
    for method in methods:
        for seed in seeds:
            folder = run_dir(out, method, seed)
            if not resume:
                try:
                    refuse_to_overwrite(folder)
                except FolderError as e:
                    raise FolderError(
                        f"{out} holds runs of a comparison ({e}); pass --resume to reuse its "
                        "finished runs and continue the others, or use another --out"
                    ) from None
                continue
            ckpt = checkpoint_path(folder, cfg.train.strategy)
            if _finished(_result(folder)) and ckpt.exists():
                try:
                    verify_checkpoint(ckpt)
                except CheckpointError as e:
                    raise CheckpointError(
                        f"cannot reuse the finished run {folder}: {e}; delete {folder} to run "
                        "it again"
                    ) from None


def _compare(
    cfg: RunConfig,
    out: Path,
    methods: list[str],
    seeds: list[int],
    jobs: int,
    quiet: bool,
    resume: bool,
    probe: bool,
    stream: TextIO | None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun every rank runs this loop, one distributed run at a time; rank 0 writes.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        jobs = 1
    jobs = max(1, min(jobs, len(methods) * len(seeds)))
    threads, thread_note = _threads(cfg, jobs)
    tasks = _tasks(cfg, out, methods, seeds, threads, quiet=quiet or jobs > 1, resume=resume)
    progress = SweepProgress(tasks, jobs, enabled=not quiet and main_rank, stream=stream)
    progress.say(
        f"flatlm compare: {len(tasks)} runs ({len(methods)} methods x {len(seeds)} seeds) into "
        f"{out}, {jobs} at a time; {thread_note}"
    )
    stop: Flag = SharedFlag(mp.get_context("spawn")) if jobs > 1 else threading.Event()
    aborted = False
    try:
        with stop_on_signals(stop):
            prepare_corpus(cfg.data)  # tokenise once here, so parallel workers only read the cache
            # jobs > 1: the runs shared the cores (or the GPU), which the report says.
            meta = {"methods": methods, "seeds": seeds, "jobs": jobs, "device": cfg.train.device}
            meta["threads"] = threads
            if main_rank:
                atomic_write_text(  # a kill mid-write leaves the previous one, not half
                    out / "compare.json", json.dumps(meta | {"config": cfg.to_dict()}, indent=1)
                )
                (out / PROBE_FILE).unlink(missing_ok=True)  # an earlier sweep's; redone below
            if not stop.is_set():
                progress.begin()
                if distributed:
                    _run_here(tasks, stop, progress)
                else:
                    _run_queued(tasks, jobs, out, stop, progress)
            progress.end(stop)
            if probe and jobs > 1 and main_rank and not stop.is_set():
                progress.say(
                    f"timing each method alone for the report ({PROBE_STEPS} steps x "
                    f"{PROBE_ROUNDS} rounds, one at a time, {threads} thread(s); a rough "
                    "figure, contended by whatever else runs on this machine)"
                )
                try:
                    timing = probe_step_times(cfg, methods, threads=threads, stop=stop)
                    atomic_write_text(out / PROBE_FILE, json.dumps(timing, indent=1))
                except Exception as e:  # the runs are done: a failed probe must not lose them
                    (out / PROBE_FILE).unlink(missing_ok=True)
                    progress.say(
                        f"timing probe failed ({type(e).__name__}: {e}); the report "
                        "shows the runs' own, contended step times"
                    )
    except KeyboardInterrupt:  # a second interrupt: the workers were killed
        aborted = True
        progress.say("aborted: runs in progress were killed; their last checkpoints remain")
    finally:
        progress.close()
    if not main_rank:  # rank 0 writes the runs' results and the report
        return {"summary": {}, "table": "", "plots": [], "files": [], "missing": []}
    missing = [t.out for t in tasks if not _finished(_result(Path(t.out)))]
    outcome = {"missing": missing, "failed": progress.failures(), "interrupted": stop.is_set()}
    if aborted or len(missing) == len(tasks):
        empty = {"summary": {}, "table": "", "plots": [], "files": []}
        return empty | outcome | {"aborted": aborted}
    return write_report(out) | outcome | {"aborted": False}


def _threads(cfg: RunConfig, jobs: int) -> tuple[int, str]:
    """Each run's torch threads, and the sentence that says where the number came from."""
    if cfg.train.threads > 0:
        n = cfg.train.threads
        return n, f"{n} torch thread{'s' if n > 1 else ''} per run (train.threads={n})"
    return default_threads(jobs)


def _tasks(
    cfg: RunConfig,
    out: Path,
    methods: list[str],
    seeds: list[int],
    threads: int,
    *,
    quiet: bool,
    resume: bool,
) -> list[Task]:
    tasks = []
    for method in methods:
        for seed in seeds:
            c = copy.deepcopy(cfg)
            c.optim.method, c.train.seed, c.train.threads = method, seed, threads
            folder = run_dir(out, method, seed)
            prior = 0
            if resume:
                prior = max(int(_result(folder).get("step") or 0), _last_step(folder))
                prior = min(prior, c.train.steps)
            task = Task(c.to_dict(), str(folder), quiet, resume, method, seed, c.train.steps, prior)
            tasks.append(task)
    # Longest first (sharpness-aware steps cost two passes): better packing across workers.
    tasks.sort(key=lambda t: t.method == "adamw")
    return tasks


def _run_here(tasks: list[Task], stop: Flag, progress: SweepProgress) -> None:
    """Under torchrun: every rank trains the same runs in the same order, one distributed run
    at a time (the training loop shares ``stop``: see
    :func:`flatlm.lm._process.stop_on_signals`)."""
    for task in tasks:
        if stop.is_set():
            break
        progress.running(task)
        progress.finished(task, _run(task, stop))


# ----------------------------------------------------------------------------- the queue


def _run_queued(
    tasks: list[Task], jobs: int, out: Path, stop: Flag, progress: SweepProgress
) -> None:
    """The runs handed out by a study queue (:mod:`flatlm.lm.study`, the queue of ``flatlm
    tune`` and ``compare --tune/--storage``) in the comparison folder: taken one after another
    here (``jobs == 1``) or by ``jobs`` spawned workers (:func:`~flatlm.lm._process.run_workers`,
    the pool ``flatlm tune`` uses). The run folders stay the record (``--resume`` reads them):
    the queue is made afresh from the tasks by every comparison and removed when it ends. A
    worker that dies takes only its run with it ("failed"); an error in a run stops the sweep
    (the other runs checkpoint) and is raised here."""
    from flatlm.lm import study as st

    queue = out / QUEUE_FILE
    _remove_queue(queue)  # a comparison killed with -9 left its queue; the folders say the rest
    study = st.open_study(st.open_storage(str(queue), out), QUEUE)
    st.add_slots(study, [{"slot": t.name, "kind": "run", "task": i} for i, t in enumerate(tasks)])
    if jobs == 1:
        _take_runs(str(queue), tasks, stop, progress)
    else:
        events = _QueueEvents(study, tasks, stop, progress)
        run_workers(
            _take_runs,
            (str(queue), tasks),
            jobs,
            stop,
            poll=events.poll,
            on_death=events.death,
            poll_s=POLL_S,
        )
        events.poll()
        if events.error is not None:
            raise events.error
    _remove_queue(queue)


def _remove_queue(queue: Path) -> None:
    for path in (queue, queue.with_name(queue.name + ".lock")):
        path.unlink(missing_ok=True)


def _take_runs(
    queue: str, tasks: list[Task], stop: Flag, progress: SweepProgress | None = None
) -> None:
    """A worker: take runs from the queue until none waits or ``stop`` is set. In the parent
    (``progress`` given) an error is raised; in a worker process it is recorded on its trial
    for the parent to raise, and stops the sweep."""
    from flatlm.lm import study as st

    study = st.open_study(st.open_storage(queue, Path(queue).parent), QUEUE, create=False)
    while not stop.is_set():
        trial = st.pop_trial(study)
        if trial is None:
            return
        task = tasks[trial.user_attrs["task"]]
        trial.set_user_attr("pid", os.getpid())
        if progress is not None:
            progress.running(task)
        try:
            with st.heartbeat(study, trial):
                result = _run(task, stop)
        except Exception as e:
            trial.set_user_attr("error", _pickled(e))
            study.tell(trial, state=st.TrialState.FAIL)
            if progress is not None:
                raise
            stop.set()
            return
        trial.set_user_attr("result", result)
        value = result.get("val_loss")
        if not _finished(result):  # interrupted: --resume continues it from its checkpoint
            study.tell(trial, state=st.TrialState.FAIL)
        else:
            study.tell(
                trial, value if isinstance(value, float) and math.isfinite(value) else math.inf
            )
        if progress is not None:
            progress.finished(task, result)


class _QueueEvents:
    """The parent's view of the queue under ``jobs > 1``: which runs started and ended (for the
    progress), the run of a worker that died (failed at once, named), a worker's error."""

    def __init__(self, study: Any, tasks: list[Task], stop: Flag, progress: SweepProgress) -> None:
        self.study, self.tasks, self.stop, self.progress = study, tasks, stop, progress
        self.started: set[int] = set()
        self.ended: set[int] = set()
        self.error: BaseException | None = None

    def poll(self) -> None:
        from flatlm.lm import study as st

        for t in self.study.get_trials(deepcopy=False):
            task, attrs = self.tasks[t.user_attrs["task"]], t.user_attrs
            if t.state == st.TrialState.RUNNING and t.number not in self.started:
                self.started.add(t.number)
                self.progress.running(task)
            elif (
                t.state in (st.TrialState.COMPLETE, st.TrialState.FAIL)
                and t.number not in self.ended
            ):
                self.ended.add(t.number)
                if "error" in attrs:
                    error = _unpickled(attrs["error"])
                    self.error = self.error or error
                    self.progress.finished(task, {"status": "failed", "reason": str(error)})
                elif "result" in attrs or "death" in attrs:
                    result = attrs.get("result") or {"status": "failed", "reason": attrs["death"]}
                    self.progress.finished(task, result)
        self.progress.poll(self.stop)

    def death(self, pid: int, exitcode: int) -> None:
        """A worker ended with ``exitcode`` in the middle of a run: that run failed (not run
        again: ``--resume`` continues it from its last checkpoint)."""
        from flatlm.lm import study as st

        storage = self.study._storage
        for t in self.study.get_trials(deepcopy=False, states=(st.TrialState.RUNNING,)):
            if t.user_attrs.get("pid") == pid:
                storage.set_trial_user_attr(t._trial_id, "death", _death(exitcode))
                storage.set_trial_state_values(t._trial_id, state=st.TrialState.FAIL)


def _pickled(e: Exception) -> str:
    """The worker's exception (with its traceback as a note, or a RuntimeError naming it) as
    text a study stores."""
    e.add_note("in the worker process:\n" + "".join(traceback.format_exception(e)))
    try:
        data = pickle.dumps(e)
    except Exception:
        data = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
    return base64.b64encode(data).decode()


def _unpickled(text: str) -> BaseException:
    return pickle.loads(base64.b64decode(text))  # our own worker's, in our own folder's queue


def _death(exitcode: int | None) -> str:
    """Why a worker process ended in the middle of a run, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        killer = " (by another process, or the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"its worker process was killed by {name}{killer}"
    return f"its worker process died (exit code {exitcode})"


# ----------------------------------------------------------------------------- progress


def _cost(method: str) -> int:
    """Relative cost of a step, for the ETA: the passes it makes (two for most sharpness-aware
    methods, one for AdamW and the one-pass momentum methods)."""
    info = method_info(method)
    return 2 if info.sharpness_aware and info.clean_backward else 1


def _duration(s: float) -> str:
    s = round(s)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class SweepProgress:
    """What ``flatlm compare`` prints while it runs (to ``stream``, default stderr).

    Always (unless disabled): the header and one line per finished run (method, seed, losses,
    wall time, the ETA of the rest). On a terminal with ``jobs > 1`` also a live bar: runs done
    of all, each running run's step (from its ``metrics.jsonl``, see :func:`_last_step`) and
    the ETA. With ``jobs == 1`` the training loop's own bar shows the steps instead.
    """

    def __init__(
        self,
        tasks: list[Task],
        jobs: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.tasks, self.jobs, self.enabled = tasks, jobs, enabled
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.live = enabled and jobs > 1 and (isatty() if live is None else live)
        self.steps: dict[str, int] = {}  # running run folder -> last step seen
        self.done: dict[str, dict[str, Any]] = {}
        self.skipped_units = 0  # reused runs: no work in this sweep
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.stopping = False

    # -- output

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(
                total=max(1, self.total_units()),
                desc=f"0/{len(self.tasks)} runs",
                unit="starting",
                file=self.stream,
                bar_format="{desc} |{bar:16}| {unit}",  # unit: the running runs and the ETA
                dynamic_ncols=True,
                leave=False,
            )
            self._refresh()

    def end(self, stop: Flag) -> None:
        self.poll(stop)
        if self.enabled and stop.is_set():
            not_started = len(self.tasks) - len(self.done) - len(self.steps)
            if not_started > 0:
                runs = "run" if not_started == 1 else "runs"
                self.say(f"{not_started} {runs} not started; continue with --resume")
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- events

    def running(self, task: Task) -> None:
        self.steps[task.out] = task.prior_step

    def finished(self, task: Task, result: dict[str, Any]) -> None:
        self.steps.pop(task.out, None)
        status = result.get("status")
        if status == "not started":
            return
        self.done[task.out] = result
        if result.get("reused"):
            self.skipped_units += self._units(task)
        self.say(self._line(task, result))
        self._refresh()

    def failures(self) -> list[str]:
        """ "<method> s<seed>: why" of every run that failed in this sweep."""
        names = {t.out: t.name for t in self.tasks}
        return [
            f"{names[out]}: {result.get('reason') or 'no reason given'}"
            for out, result in self.done.items()
            if result.get("status") == "failed"
        ]

    def notice_stop(self, stop: Flag) -> None:
        """Say once, while runs are running, that the sweep is stopping."""
        if stop.is_set() and not self.stopping:
            self.stopping = True
            if self.steps:
                self.say(
                    "stopping: running runs finish their step and write a checkpoint, no new "
                    "run starts (interrupt again to abort)"
                )

    def poll(self, stop: Flag) -> None:
        """Read the running runs' last steps into the bar."""
        self.notice_stop(stop)
        if self.bar is None:
            return
        for out in self.steps:
            self.steps[out] = max(self.steps[out], _last_step(Path(out)))
        self._refresh()

    # -- figures

    def _units(self, task: Task) -> int:
        return (task.steps - task.prior_step) * _cost(task.method)

    def total_units(self) -> int:
        return sum(self._units(t) for t in self.tasks) - self.skipped_units

    def done_units(self) -> int:
        units = 0
        for t in self.tasks:
            if t.out in self.done and not self.done[t.out].get("reused"):
                step = int(self.done[t.out].get("step") or t.steps)
                units += (step - t.prior_step) * _cost(t.method)
            elif t.out in self.steps:
                units += max(0, self.steps[t.out] - t.prior_step) * _cost(t.method)
        return units

    def eta(self) -> float | None:
        """Seconds left at the rate so far (step cost weighted by method), None before any."""
        done, total = self.done_units(), self.total_units()
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) * max(0, total - done) / done

    def _line(self, task: Task, result: dict[str, Any]) -> str:
        head = f"[{len(self.done)}/{len(self.tasks)}] {task.name}"
        status = result.get("status")
        step = f"step {result.get('step', '?')}/{task.steps}"
        if result.get("reused"):
            return f"{head}: reused ({status} before, val loss {_fmt(result.get('val_loss'))})"
        if status == "completed":
            text = (
                f"{head}: val loss {_fmt(result.get('val_loss'))}, test loss "
                f"{_fmt(result.get('test_loss'))}, {_duration(result.get('wall_time_s', 0))}"
            )
        elif status in UNFINISHED:
            return f"{head}: {status} at {step}, checkpoint written"
        else:
            reason = result.get("reason") or "no reason given"
            text = f"{head}: {status} at {step} ({reason}); not counted as a completed run"
        eta = self.eta()
        left = len(self.tasks) - len(self.done)
        if left and eta is not None and not self.stopping:
            text += f"; ETA {_duration(eta)} for the {left} left"
        return text

    def _refresh(self) -> None:
        if self.bar is None:
            return
        self.bar.total = max(1, self.total_units())
        self.bar.n = min(self.done_units(), self.bar.total)
        self.bar.set_description_str(f"{len(self.done)}/{len(self.tasks)} runs", refresh=False)
        names = {t.out: t for t in self.tasks}
        running = ", ".join(f"{names[o].name} {s}/{names[o].steps}" for o, s in self.steps.items())
        eta = self.eta()
        elapsed = _duration(time.perf_counter() - self.t0)
        tail = f"{elapsed} elapsed" + (f", ETA {_duration(eta)}" if eta is not None else "")
        self.bar.unit = f"{running} | {tail}" if running else tail
        self.bar.refresh()


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "-"


# ----------------------------------------------------------------------------- timing probe


def probe_step_times(
    cfg: RunConfig,
    methods: list[str],
    *,
    threads: int = 1,
    steps: int = PROBE_STEPS,
    rounds: int = PROBE_ROUNDS,
    budget_s: float = PROBE_BUDGET_S,
    stop: Flag | None = None,
) -> dict[str, Any]:
    """Each method's time per training step measured alone, in this process: ``steps`` steps
    (after one warm-up step) per method per round, the methods interleaved round by round
    (so a change in background load hits them all), the median over rounds. Rounds after the
    first stop once ``budget_s`` is spent. Same config, batch and threads as the runs."""
    import torch

    from flatlm.lm.data import get_batch, train_split
    from flatlm.lm.models import build_model
    from flatlm.lm.train import make_optimizer, train_step

    corpus = prepare_corpus(cfg.data)
    data = train_split(corpus, cfg.data)
    tc, device = cfg.train, torch.device(cfg.train.device)
    gen = torch.Generator().manual_seed(0)
    batches = [get_batch(data, tc.batch_size, cfg.model.block_size, gen) for _ in range(steps + 1)]
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    samples: dict[str, list[float]] = {m: [] for m in methods}
    t_start = time.perf_counter()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        for r in range(rounds):
            if r and (time.perf_counter() - t_start > budget_s or (stop and stop.is_set())):
                break
            for method in methods if r % 2 == 0 else methods[::-1]:
                c = copy.deepcopy(cfg)
                c.optim.method = method
                torch.manual_seed(0)
                model = build_model(c.model, corpus.vocab_size).to(device)
                opt = make_optimizer(model, c.optim, tc.grad_clip, c.train.steps)
                model.train()
                train_step(model, opt, *batches[0], tc.grad_clip)  # warm-up
                sync()
                t0 = time.perf_counter()
                for x, y in batches[1:]:
                    train_step(model, opt, x, y, tc.grad_clip)
                sync()
                samples[method].append((time.perf_counter() - t0) / steps)
    ms = {m: 1000 * statistics.median(s) for m, s in samples.items()}
    return {
        "what": "time per training step of each method measured alone after the sweep",
        "steps": steps,
        "rounds": len(next(iter(samples.values()))),
        "threads": threads,
        "device": tc.device,
        "ms_per_step": ms,
        "samples_ms": {m: [1000 * x for x in s] for m, s in samples.items()},
    }
