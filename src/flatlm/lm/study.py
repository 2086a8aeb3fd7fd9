"""The queue behind ``flatlm tune`` and ``flatlm compare --tune/--storage``: Optuna studies of slots.

A *study group* NAME is a set of Optuna studies in one storage: ``NAME/tune/<method>`` (one per
tuned method) and ``NAME/runs`` (the comparison's (method, seed) runs). Every study is a queue
of *slots*, each a WAITING trial enqueued once (``user_attrs["slot"]`` names it): a tuning slot
has no parameters (the sampler fills them in when the trial starts, from the trials finished by
then) or, under ``--sampler grid``, one grid point; a run slot names its method, seed and
settings. Workers (processes on one or many machines) only ever *pop* WAITING trials, which the
storage hands to exactly one of them (a state change that fails for all but one), and never
create trials of their own: so a study ends with exactly one finished trial per slot, however
many workers share it.

Storage: by default Optuna's journal file in the output folder (``study.journal``; several local
processes share it safely through its file lock); ``--storage URL`` names a database (PostgreSQL,
MySQL) that workers on many machines share.

A worker that dies: each running trial records a heartbeat every ``heartbeat_s`` seconds (Optuna's
for a database, :class:`HeartbeatJournalStorage` for the journal), the first one before it is
set running (:func:`claim`: no moment leaves a running trial without one); a worker looking
for work first fails the trials whose heartbeat is older than ``2 * heartbeat_s``, and Optuna's
retry callback enqueues each again with its slot, parameters and reported evaluations (a fresh
run in a fresh folder). A trial interrupted cleanly (Ctrl-C) is re-enqueued the same way, and
continues from its checkpoint when its next worker runs on the same host.

Records: a finished trial stores its run's ``result.json`` and the curves of its
``metrics.jsonl`` (:func:`run_record`) in the study, so a report can be written from the
storage alone (:func:`records`), with no access to the machines that ran the trials. It is
stored in chunks that fit a MySQL TEXT column however long its curves (:func:`set_record`,
read back by :func:`get_record`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flatlm._extras import require

optuna = require("optuna", "lm", feature="flatlm compare and tune (their run queue)")
from optuna.storages import BaseStorage, JournalStorage  # noqa: E402
from optuna.storages._heartbeat import BaseHeartbeat, fail_stale_trials, get_heartbeat_thread  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

JOURNAL = "study.journal"
TRIAL_FILE = "trial.json"  # in every trial's run folder: which trial it is and how it ended
HEARTBEAT_S = 20
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.WAITING, TrialState.RUNNING, *FINISHED)
_HEARTBEAT_ATTR = "flatlm:heartbeat"

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
try:  # Optuna 4.9 renamed RetryFailedTrialCallback
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _Retry
except ImportError:  # pragma: no cover - older Optuna
    from optuna.storages import RetryFailedTrialCallback as _Retry


class StudyError(ValueError):
    """A storage or study that cannot be used; the message names it and the fix."""


# ----------------------------------------------------------------------------- storage


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its database storage has: a running trial's
    heartbeat is a system attribute (the wall-clock time), so Optuna's ``fail_stale_trials``
    and retry callback work on it as on a database."""

    def __init__(self, backend: Any, heartbeat_s: int) -> None:
        super().__init__(backend)
        self._heartbeat_s = heartbeat_s
        self._retry = _Retry(inherit_intermediate_values=True)

    def record_heartbeat(self, trial_id: int) -> None:
        # A trial another worker failed as stale takes no more beats (its retry runs elsewhere).
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, grace = time.time(), 2 * self._heartbeat_s
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            # A retried trial inherits its predecessor's last beat: count from its own start.
            beats = [t.system_attrs.get(_HEARTBEAT_ATTR)]
            beats.append(t.datetime_start.timestamp() if t.datetime_start else None)
            beat = max((b for b in beats if b is not None), default=None)
            if beat is not None and now - beat > grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._retry

    def get_failed_trial_callback(self) -> Any:  # Optuna < 4.9 calls it this
        return self._retry


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def open_storage(url: str | None, folder: Path, heartbeat_s: int = HEARTBEAT_S) -> BaseStorage:
    """The journal file in ``folder`` (``url`` None), or the database at ``url``: a
    :class:`StudyError` naming it when it cannot be reached."""
    if heartbeat_s < 1:
        raise StudyError(f"--heartbeat must be >= 1 second, got {heartbeat_s}")
    if url is None or "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        path = folder / JOURNAL if url is None else Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat_s)
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"pool_pre_ping": True},
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=_Retry(inherit_intermediate_values=True),
        )
    except ImportError as e:  # the URL's database driver
        raise StudyError(
            f"storage {redact(url)} needs a database driver that is not installed ({e}); "
            "pip install 'flatlm[tune-postgres]' (PostgreSQL) or the driver your URL names"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(
            f"cannot open storage {redact(url)}: {first} (is the database server running and "
            "the URL right?)"
        ) from None


def study_names(storage: BaseStorage, group: str, *, claims: bool = False) -> list[str]:
    """The studies of ``group`` in ``storage`` (``claims``: the claim markers of the study
    named ``group`` instead, see :func:`add_slots`)."""
    names = [s.study_name for s in storage.get_all_studies()]
    if claims:
        return sorted(n for n in names if n.startswith(f"{group}#claim-"))
    return sorted(n for n in names if n.startswith(f"{group}/") and "#claim-" not in n)


def open_study(
    storage: BaseStorage, name: str, *, sampler: Any = None, pruner: Any = None, create: bool = True
) -> Any:
    """Load the study, or create it (another worker creating it at the same moment is fine)."""
    if create:
        return optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    return optuna.load_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner)


# ----------------------------------------------------------------------------- the queue


def slot_trials(study: Any) -> dict[str, list[FrozenTrial]]:
    """Every slot's trials, oldest first."""
    slots: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        slots.setdefault(t.user_attrs.get("slot"), []).append(t)
    return slots


def _missing(study: Any, slots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slots without a live trial (waiting, running or finished): never enqueued, or
    every trial of them failed."""
    have = {
        key for key, trials in slot_trials(study).items() if any(t.state in LIVE for t in trials)
    }
    return [s for s in slots if s["slot"] not in have]


def failed_slots(storage: BaseStorage, group: str) -> list[str]:
    """``"slot: why"`` for each slot of ``group`` whose last trial raised (or was dropped as a
    duplicate) and that no trial holds now (the next run of the command enqueues it again)."""
    out = []
    for name in study_names(storage, group):
        study = open_study(storage, name, create=False)
        for slot, trials in slot_trials(study).items():
            if slot is None or any(t.state in LIVE for t in trials):
                continue
            last = trials[-1].user_attrs
            why = last.get("error") or (f"dropped ({last['dropped']})" if "dropped" in last else "")
            if why:
                out.append(f"{slot}: {why}")
    return out


CLAIM_WAIT_S = 60.0  # a claim not done after this long was left by a dead worker


def add_slots(study: Any, slots: list[dict[str, Any]]) -> int:
    """Enqueue each slot (``{"slot": key, "params": {...}, ...user attrs}``) that has no live
    trial, exactly once however many workers call this at once: the worker that creates the
    claim (a marker study ``<study>#claim-<n>``; creating a study is atomic in every storage)
    enqueues, the others wait for it to be done. Returns how many this call enqueued."""
    storage = study._storage
    seen: dict[str, float] = {}  # when this call first saw each claim
    while True:
        missing = _missing(study, slots)
        if not missing:
            return 0
        claims = study_names(storage, study.study_name, claims=True)
        pending = False
        for name in claims:
            attrs = open_study(storage, name, create=False).user_attrs
            # A claim without its time (its worker died between creating and stamping it)
            # ages from when this call first saw it: it must not count as fresh for ever.
            at = attrs.get("at", seen.setdefault(name, time.time()))
            fresh = time.time() - at < CLAIM_WAIT_S
            pending = pending or (not attrs.get("done") and fresh)
        if not pending:
            try:
                marker = optuna.create_study(
                    storage=storage, study_name=f"{study.study_name}#claim-{len(claims)}"
                )
            except optuna.exceptions.DuplicatedStudyError:
                marker = None  # another worker claimed it first: wait for it
            if marker is not None:
                marker.set_user_attr("at", time.time())
                # Look again: a claim that was done by the time it was listed (after the
                # first look) has enqueued some of them; enqueuing those twice drops trials.
                missing = _missing(study, slots)
                for slot in missing:
                    attrs = {k: v for k, v in slot.items() if k != "params"}
                    study.enqueue_trial(dict(slot.get("params") or {}), user_attrs=attrs)
                marker.set_user_attr("done", True)
                return len(missing)
        time.sleep(0.2)


def pop_trial(study: Any, sampler_for: Callable[[int], Any] | None = None) -> Any | None:
    """A waiting trial, now running in this process (``optuna.Trial``), or None if none waits.

    First fails the trials whose worker stopped beating (and so re-enqueues them). A trial whose
    slot another trial already holds (two machines enqueued the same slot at once) is failed
    unrun, marked ``dropped``. ``sampler_for(trial number)`` is the sampler that trial draws
    its parameters with (seeded per trial: reproducible whatever worker runs it)."""
    fail_stale_trials(study)
    storage = study._storage
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    # Re-runs first (a trial interrupted or left by a dead worker), then in enqueue order: a
    # study stopped and continued runs its trials in the order of one never stopped.
    waiting.sort(key=_pop_order)
    for t in waiting:
        if not claim(storage, t._trial_id):
            continue
        if sampler_for is not None:
            study.sampler = sampler_for(t.number)
        trial = optuna.Trial(study, t._trial_id)
        holder = _slot_holder(study, t)
        if holder is not None:
            trial.set_user_attr("dropped", f"slot {t.user_attrs.get('slot')!r} is trial {holder}'s")
            study.tell(trial, state=TrialState.FAIL)
            continue
        return trial
    return None


def claim(storage: BaseStorage, trial_id: int) -> bool:
    """Make the waiting trial this worker's (RUNNING); False if another worker took it first.

    The first heartbeat is written *before* the state change, so a worker killed at any moment
    leaves its trial either WAITING (the next worker pops it) or RUNNING with a heartbeat that
    goes stale after the grace period (the next worker fails it and runs its retry). The other
    order left a RUNNING trial without a heartbeat row, which Optuna's database storage never
    takes for stale: a study that never ends. A beat on a trial that stays WAITING is harmless
    (only RUNNING trials are checked); the state change is the one atomic step, which one worker
    wins. A database stamps beats with its own clock, the clock its stale check reads.
    """
    beat_once(storage, trial_id)
    try:
        return storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def beat_once(storage: BaseStorage, trial_id: int) -> None:
    """One heartbeat now (the thread beats from then on)."""
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        storage.record_heartbeat(trial_id)


def _pop_order(t: FrozenTrial) -> tuple[bool, int]:
    """Re-runs first (they may resume from a checkpoint), then in enqueue order."""
    return ("failed_trial" not in t.system_attrs, t.number)


def _slot_holder(study: Any, trial: FrozenTrial) -> int | None:
    """The number of another trial that already holds this trial's slot, if any: one running
    or finished, or one waiting before it in pop order (so of a re-run and a duplicate
    enqueued while it was being re-enqueued, the re-run, which holds the checkpoint, is kept)."""
    slot = trial.user_attrs.get("slot")
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or t.user_attrs.get("slot") != slot:
            continue
        if t.state in (TrialState.RUNNING, *FINISHED) or (
            t.state == TrialState.WAITING and _pop_order(t) < _pop_order(trial)
        ):
            return t.number
    return None


@contextmanager
def heartbeat(study: Any, trial: Any) -> Iterator[None]:
    """Beat for ``trial`` in a thread while the block runs."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def requeue(study: Any, trial: Any, **user_attrs: Any) -> None:
    """Fail a trial that stopped before its end (Ctrl-C) and enqueue it again: the same slot,
    parameters and evaluations, plus ``user_attrs`` (where to resume from)."""
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    frozen = study.tell(trial, state=TrialState.FAIL)
    _Retry(inherit_intermediate_values=True)(study, copy.deepcopy(frozen))


def counts(study: Any) -> dict[str, int]:
    """Trials by state (lower-case names) and the number of slots."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    out["slots"] = len([k for k in slot_trials(study) if k is not None])
    return out


def finished(trials: list[FrozenTrial]) -> bool:
    """A slot's trials hold a complete or pruned one."""
    return any(t.state in FINISHED for t in trials)


def settled(study: Any) -> bool:
    """Nothing waiting or running: every slot finished, or failed with an error (a slot that
    failed is enqueued again by the next :func:`add_slots`, i.e. the next run of the command)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    return not trials


# ----------------------------------------------------------------------------- records


CURVE_KEYS = ("step", "split", "loss", "hessian.lambda_max", "sam.logit_functional_ratio")


def run_record(run_dir: Path) -> dict[str, Any]:
    """What a study keeps of a finished run: its ``result.json`` and the records of its
    ``metrics.jsonl`` that reports read (the loss curves and sharpness), each cut to
    ``CURVE_KEYS``."""
    result = json.loads((run_dir / "result.json").read_text())
    metrics = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("split") in ("train", "val", "test", "sharpness"):
                    metrics.append({k: rec[k] for k in CURVE_KEYS if k in rec})
    config = json.loads((run_dir / "config.json").read_text())
    return {"result": result, "metrics": metrics, "config": config}


# A database storage keeps each user attribute as json.dumps(value) in one TEXT column, which
# holds 65,535 bytes in MySQL: a record (its curves grow with the steps logged) is stored in
# chunks of its JSON text. The text is ASCII (ensure_ascii), and json.dumps of an ASCII string
# writes each character as at most two (`"` and `\` are escaped): a chunk of RECORD_CHUNK
# characters is stored in at most 2 * RECORD_CHUNK + 2 bytes.
RECORD_CHUNK = 30_000
_RECORD = "record"  # a study written before chunking: the record as one attribute
_RECORD_COUNT = "record#n"


def set_record(trial: Any, record: dict[str, Any] | None) -> None:
    """Store ``record`` on the running ``trial`` (``optuna.Trial``) as ``record#0``,
    ``record#1``, ... and their count ``record#n``, written last: a worker killed in the middle
    leaves no count, so no partial record is ever read (and the trial, not finished, is run
    again). A record of None (a reused trial without one) stores nothing."""
    if record is None:
        return
    text = json.dumps(record, ensure_ascii=True, allow_nan=True)
    chunks = [text[i : i + RECORD_CHUNK] for i in range(0, len(text), RECORD_CHUNK)] or [""]
    for i, chunk in enumerate(chunks):
        trial.set_user_attr(f"record#{i}", chunk)
    trial.set_user_attr(_RECORD_COUNT, len(chunks))


def get_record(trial: Any) -> dict[str, Any] | None:
    """The record :func:`set_record` stored on ``trial`` (an ``optuna.Trial`` or a
    ``FrozenTrial``), or the single ``record`` attribute of a study written before; None if
    it has none (or only part of one)."""
    attrs = trial.user_attrs
    n = attrs.get(_RECORD_COUNT)
    if n is None:
        return attrs.get(_RECORD)
    return json.loads("".join(attrs[f"record#{i}"] for i in range(n)))


def trial_summary(trial: FrozenTrial, study_name: str) -> dict[str, Any]:
    """A finished trial as the reports see it (no run record)."""
    return {
        "study": study_name,
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": dict(trial.params),
        "slot": trial.user_attrs.get("slot"),
        "kind": trial.user_attrs.get("kind"),
        "method": trial.user_attrs.get("method"),
        "seed": trial.user_attrs.get("seed"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "host": trial.user_attrs.get("host"),
        "retry_of": trial.system_attrs.get("failed_trial"),
    }


def records(storage: BaseStorage, group: str) -> dict[str, list[dict[str, Any]]]:
    """Every finished trial of the group's studies with its run record, from the storage
    alone: ``{study name: [trial summary + "record"], ...}``, by trial number."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in study_names(storage, group):
        study = open_study(storage, name, create=False)
        rows = []
        for t in study.get_trials(deepcopy=False, states=FINISHED):
            rows.append(trial_summary(t, name) | {"record": get_record(t)})
        out[name] = sorted(rows, key=lambda r: r["number"])
    return out


def folder_records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The same as :func:`records`, read from the run folders under ``folder/trials`` instead
    (each finished trial's ``trial.json``, ``result.json``, ``metrics.jsonl``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((folder / "trials").glob(f"*/*/{TRIAL_FILE}")):
        summary = json.loads(path.read_text())
        if summary.get("state") not in ("COMPLETE", "PRUNED"):
            continue
        source = Path(summary.pop("record_from", None) or path.parent)
        if not (source / "result.json").is_file():  # a reused run trained on another machine
            continue
        summary["record"] = run_record(source)
        out.setdefault(summary["study"], []).append(summary)
    return {k: sorted(v, key=lambda r: r["number"]) for k, v in sorted(out.items())}


def write_trial_file(run_dir: Path, summary: dict[str, Any]) -> None:
    from flatlm.lm._io import atomic_write_text

    atomic_write_text(run_dir / TRIAL_FILE, json.dumps(summary, indent=1))


def host() -> str:
    return socket.gethostname()


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")
