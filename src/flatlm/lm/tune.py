"""``flatlm tune`` and ``flatlm compare --tune/--storage``: runs handed out by an Optuna study.

One job (:class:`Job`) is a study group (:mod:`flatlm.lm.study`): for each tuned method a study
of ``trials`` slots whose trials train the config at the tuning seed with sampled settings
(``--param KEY=SPEC``; a sharpness-aware method without ``--param`` tunes ``optim.rho`` over
:func:`default_space`) and minimise the final validation loss; each evaluation is reported to
the trial so a pruner can stop it early. With ``final_seeds`` (``compare --tune``) a ``runs``
study then trains every method at every seed, a tuned method at its best trial's settings (the
tuning seed's run is that trial, reused): the tuned-against-tuned protocol, with paired verdicts
on the test split. ``compare --storage`` without ``--tune`` is the ``runs`` study alone.

Workers are ``jobs`` local processes, and any number of other machines running the same command
against the same ``--storage``; each trains into ``<out>/trials/<study>/<trial number>/``.
Re-running the command continues the group; a changed config is refused (:func:`check_meta`).

Reports (:func:`write_reports`): ``tune.md``/``tune.json`` (every trial, the best, plots of
validation loss against each parameter), ``best_<method>.yaml`` (a config ``flatlm train`` and
``compare --config`` take as is), and for a ``runs`` study the comparison report of
:mod:`flatlm.lm.report` over a ``runs/`` view of the trials' records. They are written from the
storage alone, or from the run folders (``flatlm report DIR``): the same report either way.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flatlm.lm import study as st
from flatlm.lm._process import Flag, SharedFlag, default_threads, run_workers, stop_on_signals
from flatlm.lm.config import (
    RESUME_ALLOWED,
    ConfigError,
    RunConfig,
    check_device_present,
    config_from_dict,
    setting_changes,
    validate,
)
from flatlm.lm.report import BASELINE, run_dir, write_report
from flatlm.optim.registry import default_rho, parse_method

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
POLL_S = 1.0
# A method's default ρ range: from a tenth to fifty times its default radius (sam: 0.005-2.5);
# SAM's best ρ ranges from 0.05 (GPT) to 2 (the LSTM setting) in docs/results.md.
RHO_BELOW, RHO_ABOVE = 10.0, 50.0
META = "flatlm:job"
# What the storage raises when a worker writes to a trial another worker already failed as stale.
DEAD = st.optuna.exceptions.UpdateFinishedTrialError
STUDY_FILE = "study.json"


# ----------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One tuned config key: ``kind`` "log" / "float" / "int" over [low, high], or "cat" over
    ``choices``."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "cat":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))  # type: ignore[arg-type]
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def text(self) -> str:
        if self.kind == "cat":
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        scale = " (log)" if self.kind == "log" else ""
        return f"{self.key} in [{self.low:g}, {self.high:g}]{scale}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "low": self.low,
            "high": self.high,
            "choices": list(self.choices),
        }


def _value(raw: str) -> Any:
    """A listed value: an int, a float as Python writes it (``.5``, ``1e-3``, which TOML does
    not all take), else a TOML value (``true``), else the text itself."""
    text = raw.strip()
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_param(item: str) -> Param:
    """``KEY=log:LOW:HIGH``, ``KEY=float:LOW:HIGH``, ``KEY=int:LOW:HIGH`` or ``KEY=A,B,C``
    (listed values, also ``KEY=cat:A,B,C``); a ConfigError naming the problem otherwise."""
    if "=" not in item:
        raise ConfigError(f"--param {item!r} must look like KEY=log:LOW:HIGH or KEY=A,B,C")
    key, spec = (x.strip() for x in item.split("=", 1))
    kind, _, rest = spec.partition(":")
    if kind in ("log", "float", "int"):
        bounds = rest.split(":")
        if len(bounds) != 2:
            raise ConfigError(f"--param {item!r}: a range is {kind}:LOW:HIGH")
        try:
            low, high = (float(b) for b in bounds)
        except ValueError:
            raise ConfigError(f"--param {item!r}: LOW and HIGH must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"--param {item!r}: LOW and HIGH must be finite numbers")
        if low >= high:
            raise ConfigError(
                f"--param {item!r}: empty or inverted range (LOW {low:g} must be below HIGH {high:g})"
            )
        if kind == "log" and low <= 0:
            raise ConfigError(f"--param {item!r}: a log range needs LOW > 0")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"--param {item!r}: an int range needs whole-number bounds")
        return Param(key, kind, low, high)
    values = rest if kind == "cat" else spec
    choices = tuple(_value(v) for v in values.split(",") if v.strip())
    if not choices:
        raise ConfigError(f"--param {item!r}: no values to choose from")
    if len({(type(c) in (int, float), c) for c in choices}) != len(choices):  # 1 and 1.0 too
        raise ConfigError(f"--param {item!r}: a value is listed twice")
    return Param(key, "cat", choices=choices)


def scoped_params(
    items: list[str], methods: list[str]
) -> tuple[list[Param], dict[str, list[Param]]]:
    """``--param`` items: ``KEY=SPEC`` for every tuned method, ``METHOD@KEY=SPEC`` for that
    method alone (its space is then its own ``@`` items only: a method whose settings live on
    another scale, e.g. bSAM's ρ and lr). Returns (the shared items, {method: its items})."""
    shared: list[Param] = []
    scoped: dict[str, list[Param]] = {}
    for item in items:
        method, at, rest = item.partition("@")
        if not at:
            shared.append(parse_param(item))
            continue
        if method.strip() not in methods:
            raise ConfigError(
                f"--param {item!r}: {method.strip()!r} is not one of --methods "
                f"({', '.join(methods)}); write METHOD@KEY=SPEC with METHOD as --methods names it"
            )
        scoped.setdefault(method.strip(), []).append(parse_param(rest))
    return shared, scoped


def default_space(method: str) -> list[Param]:
    """ρ on a log scale around the method's default radius; nothing for AdamW."""
    rho = default_rho(method)
    if rho is None:
        return []
    low, high = rho / RHO_BELOW, rho * RHO_ABOVE
    return [Param("optim.rho", "log", float(f"{low:.6g}"), float(f"{high:.6g}"))]


def with_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> RunConfig:
    """The config ``cfg`` (a dict) with ``{"section.key": value}`` set, checked like a loaded
    config (a ConfigError names an unknown key or a bad value)."""
    data = copy.deepcopy(cfg)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    out = config_from_dict(data)
    validate(out)
    return out


def one_run(cfg: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
    """A copy of ``cfg`` (a dict) as the config of one run of ``method`` at ``seed``. Its
    ``compare.methods`` is that method alone: the config is checked as this run's, so a table
    only this method takes (a step policy's options in ``[optim.method_kwargs.sam]``) is not
    refused for another method the preset compares (plain ``sam``)."""
    out = copy.deepcopy(cfg)
    out["optim"]["method"], out["train"]["seed"] = method, seed
    out.setdefault("compare", {})["methods"] = [method]
    return out


def check_space(cfg: RunConfig, method: str, space: list[Param]) -> None:
    """Every parameter names a config key that takes its values (checked at both ends of a
    range), and none is fixed elsewhere (ρ in the method's name)."""
    base = one_run(cfg.to_dict(), method, cfg.train.seed)
    keys = [p.key for p in space]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--param names a key twice: {keys}")
    ends = {}
    for p in space:
        if p.key in ("optim.method", "train.seed") or p.key.startswith("compare."):
            raise ConfigError(f"--param {p.key}: not a setting to tune (the job sets it)")
        if p.key == "optim.rho" and "rho" in parse_method(method)[1]:
            raise ConfigError(
                f"--param optim.rho: method {method!r} fixes rho in its name; drop it there"
            )
        values = list(p.choices) if p.kind == "cat" else [p.low, p.high]
        ends[p.key] = [int(v) for v in values] if p.kind == "int" else values
    # The method with every parameter at its first value, then each parameter at both ends:
    # options that need each other (LookSAM's every and looksam_alpha) are checked together.
    first = {key: values[0] for key, values in ends.items()}
    try:
        with_overrides(base, first)
    except ConfigError as e:
        at = f" at {', '.join(f'{k}={v}' for k, v in first.items())}" if first else ""
        raise ConfigError(f"method {method!r}{at}: {e}") from None
    for key, values in ends.items():
        for v in values:
            try:
                with_overrides(base, {**first, key: v})
            except ConfigError as e:
                raise ConfigError(f"--param {key}: {e}") from None


def grid_points(space: list[Param]) -> list[dict[str, Any]]:
    """Every combination of the listed values (``--sampler grid``)."""
    ranged = [p.key for p in space if p.kind != "cat"]
    if ranged:
        raise ConfigError(
            f"--sampler grid needs listed values (e.g. --param optim.rho=0.02,0.2,2), "
            f"not ranges: {', '.join(ranged)}"
        )
    combos = itertools.product(*(p.choices for p in space))
    return [dict(zip([p.key for p in space], c, strict=True)) for c in combos]


# ----------------------------------------------------------------------------- the job


@dataclass
class Job:
    """Everything a worker needs (picklable): where, what to tune, what to run afterwards."""

    folder: str
    group: str
    base: dict[str, Any]  # the config (method and seed are set per trial)
    methods: list[str]
    spaces: dict[str, list[dict[str, Any]]]  # method -> Param dicts; empty: not tuned
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    tune_seed: int = 0
    final_seeds: list[int] | None = None  # compare: every method at these seeds
    storage: str | None = None
    heartbeat_s: int = st.HEARTBEAT_S
    quiet: bool = False
    threads: int = 1
    sampler_seed: int = 0

    def space(self, method: str) -> list[Param]:
        return [Param(**{**p, "choices": tuple(p["choices"])}) for p in self.spaces[method]]

    def tuned(self) -> list[str]:
        return [m for m in self.methods if self.spaces[m]]

    def tune_key(self, method: str) -> str:
        return f"{self.group}/tune/{method}"

    @property
    def runs_key(self) -> str:
        return f"{self.group}/runs"

    def meta(self) -> dict[str, Any]:
        """What the group was made with (stored in each study and in ``study.json``)."""
        return {
            "config": self.base,
            "methods": self.methods,
            "spaces": self.spaces,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "tune_seed": self.tune_seed,
            "final_seeds": self.final_seeds,
        }


def make_job(
    cfg: RunConfig,
    out: str | Path,
    methods: list[str],
    params: list[str],
    *,
    trials: int = 20,
    sampler: str = "tpe",
    pruner: str = "median",
    final_seeds: list[int] | None = None,
    storage: str | None = None,
    study: str | None = None,
    heartbeat_s: int = st.HEARTBEAT_S,
    quiet: bool = False,
    jobs: int = 1,
    tune: bool = True,
) -> Job:
    """Check every input (a ConfigError or StudyError naming it) and build the job."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    parse_pruner(pruner)
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if not methods:
        raise ConfigError("no methods to tune: name them with --methods")
    check_device_present(cfg.train.device)
    given, scoped = scoped_params(params, methods)
    spaces: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        shared = given
        if default_rho(method) is None:  # AdamW has no radius: a shared ρ is not its to tune
            shared = [p for p in given if p.key != "optim.rho"]
        space = (scoped.get(method) or shared or default_space(method)) if tune else []
        check_space(cfg, method, space)
        if sampler == "grid":
            grid_points(space)
        spaces[method] = [p.to_dict() for p in space]
    if tune and final_seeds is None and not any(spaces.values()):
        raise ConfigError(
            f"nothing to tune for {', '.join(methods)}: give --param (e.g. "
            "--param optim.lr=log:1e-4:1e-2)"
        )
    if final_seeds is not None and BASELINE not in methods:
        raise ConfigError(f"--methods must include {BASELINE}: every verdict is against it")
    threads = cfg.train.threads or default_threads(jobs).threads
    base = cfg.to_dict()
    base["compare"]["methods"] = list(methods)  # each checked above, with its own space
    return Job(
        folder=str(out),
        group=study or ("compare" if final_seeds is not None else "tune"),
        base=base,
        methods=list(methods),
        spaces=spaces,
        trials=trials,
        sampler=sampler,
        pruner=pruner,
        tune_seed=cfg.train.seed if final_seeds is None else final_seeds[0],
        final_seeds=final_seeds,
        storage=storage,
        heartbeat_s=heartbeat_s,
        quiet=quiet,
        threads=threads,
    )


def _sampler(job: Job, number: int, n_trials: int) -> Any:
    """The sampler of trial ``number``: seeded by it, so a study run by one worker is
    reproducible. TPE starts after a third of the trials (at least 2, at most 10) are random."""
    optuna = st.optuna
    seed = job.sampler_seed + number
    if job.sampler == "tpe":
        startup = min(10, max(2, n_trials // 3))
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True
        )
    return optuna.samplers.RandomSampler(seed=seed)


def parse_pruner(spec: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:FRACTION`` (median, hyperband): the pruner, and the fraction of the
    training steps before which it prunes nothing (0: from the first evaluation on)."""
    name, colon, after = spec.partition(":")
    if name not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {spec!r}")
    if not colon:
        return name, 0.0
    try:
        fraction = float(after)
    except ValueError:
        fraction = -1.0
    if name == "none" or not 0.0 <= fraction < 1.0:
        raise ConfigError(
            f"--pruner {spec!r}: the part after ':' is the fraction of the steps before which "
            "nothing is pruned, in [0, 1), and only for median or hyperband (e.g. median:0.5)"
        )
    return name, fraction


def _pruner(job: Job) -> Any:
    optuna = st.optuna
    name, after = parse_pruner(job.pruner)
    steps, every = job.base["train"]["steps"], job.base["train"]["eval_every"] or 0
    if name == "none" or every <= 0:
        return optuna.pruners.NopPruner()
    # No pruning before the first evaluation, nor before `after` of the run: early validation
    # losses rank learning rates poorly (a high lr starts slower and ends lower).
    first = max(every, math.ceil(after * steps))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=steps)
    # Median: prune a trial whose validation loss is worse than the median of the finished
    # trials' at the same step, once two have finished, from step `first` on.
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first)


def check_meta(study: Any, job: Job) -> None:
    """Store what the group is made with, or refuse a study made with another config."""
    have = study.user_attrs.get(META)
    want = json.loads(json.dumps(job.meta()))
    if have is None:
        study.set_user_attr(META, want)
        return
    diffs = []
    before, now = config_from_dict(have["config"]), config_from_dict(want["config"])
    free = set(RESUME_ALLOWED) - {"train.steps"}
    diffs += [
        f"{k} = {a!r} there, {b!r} now" for k, a, b in setting_changes(before, now) if k not in free
    ]
    for key in ("spaces", "sampler", "pruner", "tune_seed", "final_seeds"):
        a, b = have.get(key), want.get(key)
        if key == "spaces":  # this study's own method
            a = {m: s for m, s in (a or {}).items() if m in want["spaces"]}
            b = {m: s for m, s in b.items() if m in (have.get("spaces") or {})}
        if a != b:
            diffs.append(f"{key} = {a!r} there, {b!r} now")
    if diffs:
        raise st.StudyError(
            f"study {study.study_name!r} was made with another config ({'; '.join(diffs)}); "
            "use another --study (or --out), or the same settings to continue it"
        )


def tuning_slots(job: Job, method: str) -> list[dict[str, Any]]:
    """The trials ``method``'s tuning study holds: one per grid point, or ``job.trials``."""
    if job.sampler == "grid":
        points = grid_points(job.space(method))
        slots = [{"slot": json.dumps(p, sort_keys=True), "params": p} for p in points]
    else:
        slots = [{"slot": f"{i}"} for i in range(job.trials)]
    return [s | {"kind": "tune", "method": method, "seed": job.tune_seed} for s in slots]


def _run_slot(method: str, seed: int) -> str:
    return f"{method} s{seed}"


def setup(job: Job, storage: Any) -> dict[str, Any]:
    """Create (or load and check) the group's studies and enqueue their slots; idempotent, so
    every worker on every machine may call it."""
    studies = {}
    for method in job.tuned():
        study = st.open_study(storage, job.tune_key(method), pruner=_pruner(job))
        check_meta(study, job)
        st.add_slots(study, tuning_slots(job, method))
        studies[job.tune_key(method)] = study
    if job.final_seeds is not None:
        study = st.open_study(storage, job.runs_key)
        check_meta(study, job)
        studies[job.runs_key] = study
        advance(job, storage, studies)
    return studies


def advance(job: Job, storage: Any, studies: dict[str, Any]) -> int:
    """Enqueue the comparison runs whose settings are known: untuned methods at once, a tuned
    one when its tuning study has settled (at its best trial's settings). Returns how many."""
    if job.final_seeds is None:
        return 0
    runs = studies[job.runs_key]
    made = st.slot_trials(runs)
    slots = []
    for method in job.methods:
        best = None
        if job.spaces[method]:
            tune = studies[job.tune_key(method)]
            # Every slot finished, not only nothing running: a trial going back to the queue
            # (failed, its retry not yet enqueued) or one that raised may still set the best.
            trials = st.slot_trials(tune)
            wanted = (s["slot"] for s in tuning_slots(job, method))
            if not st.settled(tune) or not all(st.finished(trials.get(k, [])) for k in wanted):
                continue
            best = best_trial(tune)
            if best is None:
                raise st.StudyError(
                    f"no tuning trial of {method} completed with a finite validation loss; "
                    "widen the --param range"
                )
            _check_runs_at(method, best, made, job)
        for seed in job.final_seeds:
            slot = {"slot": _run_slot(method, seed), "kind": "run", "method": method, "seed": seed}
            slot["overrides"] = dict(best.params) if best else {}
            if best is not None and seed == job.tune_seed:  # that run is the best trial
                slot |= {"kind": "reuse", "from": [job.tune_key(method), best.number]}
            slots.append(slot)
    return st.add_slots(runs, slots)


def _check_runs_at(method: str, best: Any, made: dict[str, list[Any]], job: Job) -> None:
    """Refuse a comparison whose runs of ``method`` were made at other settings than its
    tuning's best now (more trials since): its report would pair those runs with a best they
    never used."""
    for seed in job.final_seeds or []:
        for t in made.get(_run_slot(method, seed), []):
            used = t.user_attrs.get("overrides")
            if used is not None and used != dict(best.params):
                raise st.StudyError(
                    f"the runs of {method} were made at {used}, but its tuning's best is now "
                    f"trial {best.number} ({dict(best.params)}): trials were added after the "
                    "runs started. Compare at the new best in another --out (or --study), or "
                    "continue this comparison with its first --trials"
                )


def best_trial(study: Any) -> Any | None:
    """The completed trial with the lowest finite validation loss (ties: the earlier)."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(st.TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    return min(done, key=lambda t: (t.value, t.number)) if done else None


def done(job: Job, studies: dict[str, Any]) -> bool:
    if not all(st.settled(s) for s in studies.values()):
        return False
    if job.final_seeds is None:
        return True
    want = len(job.methods) * len(job.final_seeds)
    return st.counts(studies[job.runs_key])["slots"] >= want


# ----------------------------------------------------------------------------- a worker


def work(job: Job, stop: Flag, on_trial: Any = None) -> None:
    """Take trials from the group's studies until every slot is finished or ``stop`` is set."""
    storage = st.open_storage(job.storage, Path(job.folder), job.heartbeat_s)
    studies = setup(job, storage)
    while not stop.is_set():
        ran = False
        for key, study in studies.items():
            n = job.trials if "/tune/" in key else 0
            trial = st.pop_trial(study, lambda k, n=n: _sampler(job, k, n))
            if trial is not None:
                run_trial(job, storage, study, trial, stop)
                if on_trial is not None:
                    on_trial()
                ran = True
                break
        if ran:
            continue
        added = advance(job, storage, studies)
        if done(job, studies):
            return
        if not added and all(st.settled(s) for s in studies.values()):
            return  # a slot failed (st.failed_slots): only the next command can run it again
        _sleep(stop, POLL_S)


def _sleep(stop: Flag, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        time.sleep(0.1)


def trial_dir(job: Job, study: Any, trial: Any) -> Path:
    """A folder of this trial's own: numbers are unique in a study, and a study's trials
    are the only writers under its folder."""
    kind = study.study_name.removeprefix(f"{job.group}/").replace("/", "-")
    attrs = trial.user_attrs
    suffix = f"-{attrs['method']}-s{attrs['seed']}" if attrs.get("kind") != "tune" else ""
    name = f"{trial.number:04d}{suffix}".replace(":", "_").replace(",", "_")
    return Path(job.folder) / "trials" / kind / name


def run_trial(job: Job, storage: Any, study: Any, trial: Any, stop: Flag) -> None:
    """Train one trial and record it in the study (and its folder's ``trial.json``)."""
    from flatlm.lm.checkpoint import has_checkpoint
    from flatlm.lm.train import train

    attrs = trial.user_attrs
    method, seed, kind = attrs["method"], attrs["seed"], attrs["kind"]
    folder = trial_dir(job, study, trial)
    if kind == "reuse":
        src_name, number = attrs["from"]
        src = st.open_study(storage, src_name, create=False).trials[number]
        st.set_record(trial, st.get_record(src))
        for key in ("run_dir", "host"):
            trial.set_user_attr(key, src.user_attrs.get(key))
        frozen = study.tell(trial, src.value)
        folder.mkdir(parents=True, exist_ok=True)
        summary = st.trial_summary(frozen, study.study_name)
        if src.user_attrs.get("host") == st.host():
            summary["record_from"] = src.user_attrs.get("run_dir")
        st.write_trial_file(folder, summary)
        return
    try:
        if kind == "tune":
            overrides = {p.key: p.suggest(trial) for p in job.space(method)}
        else:
            overrides = dict(attrs.get("overrides") or {})
    except DEAD:  # failed by another worker before it started (a late first heartbeat)
        return
    base = one_run(job.base, method, seed)
    base["train"]["threads"] = job.threads
    cfg = with_overrides(base, overrides)
    resume_dir = attrs.get("resume_dir")
    resume = bool(resume_dir) and attrs.get("host") == st.host() and Path(resume_dir).is_dir()
    if resume:
        folder = Path(resume_dir)
    try:
        trial.set_user_attr("run_dir", str(folder))
        trial.set_user_attr("host", st.host())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("resume_dir", None)
    except DEAD:
        return

    def report(step: int, val: float) -> str | None:
        if kind != "tune":
            return None
        try:
            trial.report(val, step)
            if trial.should_prune():
                return f"pruned by the {job.pruner} pruner at step {step} (val loss {val:.4f})"
        except DEAD:  # failed by another worker (a late heartbeat): it runs again there
            return "taken for dead by another worker (a late heartbeat); re-run there"
        return None

    try:
        with st.heartbeat(study, trial):
            result = train(cfg, folder, resume=resume, quiet=job.quiet, on_eval=report)
    except KeyboardInterrupt:  # a second interrupt: again later, from its last checkpoint
        st.requeue(study, trial, resume_dir=str(folder) if has_checkpoint(folder) else None)
        raise
    except BaseException as e:  # an error: the slot is enqueued again by the next run
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=st.TrialState.FAIL)
        raise
    status = result["status"]
    try:
        if status in ("interrupted", "stopped"):  # Ctrl-C: again later, from the checkpoint
            st.requeue(study, trial, resume_dir=str(folder))
            return
        st.set_record(trial, st.run_record(folder))
        value = result.get("val_loss")
        if status == "pruned":
            frozen = study.tell(trial, state=st.TrialState.PRUNED)
        else:  # completed, or diverged: a loss that can never be the best
            finite = value is not None and math.isfinite(value)
            frozen = study.tell(trial, value if finite else math.inf)
    except DEAD:
        return  # another worker took it for dead (a late heartbeat) and re-enqueued it
    st.write_trial_file(folder, st.trial_summary(frozen, study.study_name))


# ----------------------------------------------------------------------------- the command


def run(job: Job, *, jobs: int = 1, stream: TextIO | None = None) -> dict[str, Any]:
    """Run the job here with ``jobs`` worker processes (1: in this process) until its studies
    are finished or an interrupt stops it; then write the reports. Returns ``{"stopped",
    "files", "best", "table"}``."""
    from flatlm.lm.data import prepare_corpus

    stream = stream or sys.stderr
    out = Path(job.folder)
    out.mkdir(parents=True, exist_ok=True)
    storage = st.open_storage(job.storage, out, job.heartbeat_s)
    studies = setup(job, storage)
    (out / STUDY_FILE).write_text(json.dumps(job.meta() | {"group": job.group}, indent=1))
    progress = Progress(job, storage, stream, enabled=not job.quiet)
    where = st.redact(job.storage) if job.storage else f"{out / st.JOURNAL}"
    tuned = job.tuned()
    what = f"tuning {', '.join(tuned)} ({_trials_text(job)}, {job.sampler}, pruner {job.pruner})"
    if job.final_seeds is not None:
        what = (what + "; then " if tuned else "") + (
            f"{', '.join(job.methods)} at seeds {job.final_seeds}"
        )
    progress.say(
        f"flatlm {'compare' if job.final_seeds is not None else 'tune'}: {what}; study "
        f"{job.group!r} in {where}; {jobs} worker process(es) here, {job.threads} torch "
        f"thread(s) per run; runs in {out / 'trials'}"
    )
    progress.update()
    multi = jobs > 1
    stop: Flag = SharedFlag(mp.get_context("spawn")) if multi else threading.Event()
    aborted, crashed = False, []
    try:
        with stop_on_signals(stop):
            prepare_corpus(config_from_dict(job.base).data)  # tokenise once, before workers
            if not done(job, studies) and not stop.is_set():
                if multi:
                    crashed = _run_workers(job, jobs, stop, progress)
                else:
                    work(job, stop, on_trial=progress.update)
    except KeyboardInterrupt:
        aborted = True
    progress.update()
    stopped = aborted or stop.is_set()
    if stopped:
        progress.say(
            "stopped: running trials wrote a checkpoint and went back to the queue; the same "
            "command continues the study" + (" (a second interrupt killed them)" if aborted else "")
        )
    # With one worker an error is raised here; with several it ended a worker: a slot left
    # failed names it, else the worker's exit code (its traceback went to stderr).
    failed = [] if stopped else st.failed_slots(storage, job.group)
    if crashed and not stopped and not failed:
        failed = [f"{len(crashed)} worker process(es) ended with exit codes {crashed} (see above)"]
    recs = st.records(storage, job.group)
    if not any(recs.values()):
        return {"stopped": stopped, "files": [], "best": {}, "table": "", "failed": failed}
    report = write_reports(out, job.meta(), recs)
    return report | {"stopped": stopped, "failed": failed}


def _trials_text(job: Job) -> str:
    if job.sampler == "grid":
        sizes = {len(grid_points(job.space(m))) for m in job.tuned()}
        return f"{'/'.join(map(str, sorted(sizes)))} grid points each"
    return f"{job.trials} trials each"


def _run_workers(job: Job, jobs: int, stop: Flag, progress: Progress) -> list[int]:
    """``jobs`` spawned workers on the same storage (:func:`flatlm.lm._process.run_workers`, the
    pool ``flatlm compare`` uses too); the parent prints their trials. A worker that dies leaves
    its trial to the heartbeat (the others re-run it); a second interrupt kills them all."""
    codes = run_workers(work, (job,), jobs, stop, poll=progress.update, poll_s=POLL_S)
    failed = [c for c in codes if c]
    if failed and not stop.is_set():
        progress.say(f"{len(failed)} worker(s) failed (exit codes {failed}); see above")
    return failed


class Progress:
    """One line per finished trial, read from the storage (so also trials of other machines)."""

    def __init__(self, job: Job, storage: Any, stream: TextIO, enabled: bool = True) -> None:
        self.job, self.storage, self.stream, self.enabled = job, storage, stream, enabled
        self.seen: set[tuple[str, int]] = set()
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def update(self) -> None:
        if not self.enabled:
            return
        for name in st.study_names(self.storage, self.job.group):
            study = st.open_study(self.storage, name, create=False)
            trials = study.get_trials(deepcopy=False)
            slots = len({t.user_attrs.get("slot") for t in trials})
            finished = [t for t in trials if t.state in st.FINISHED]
            for t in sorted(finished, key=lambda t: t.datetime_complete or 0):
                if (name, t.number) in self.seen:
                    continue
                self.seen.add((name, t.number))
                n = len([x for x in self.seen if x[0] == name])
                self.say(self.line(name, t, n, slots, study))

    def line(self, name: str, t: Any, n: int, slots: int, study: Any) -> str:
        short = name.removeprefix(f"{self.job.group}/")
        result = (st.get_record(t) or {}).get("result") or {}
        head = f"[{short} {n}/{slots}]"
        steps = f"{result.get('step', '?')}/{result.get('steps', '?')} steps"
        if t.user_attrs.get("kind") in ("run", "reuse"):
            what = f"{t.user_attrs['method']} s{t.user_attrs['seed']}"
            if t.user_attrs.get("kind") == "reuse":
                return f"{head} {what}: the best tuning trial's run, reused"
            return (
                f"{head} {what}: val loss {_fmt(result.get('val_loss'))}, test loss "
                f"{_fmt(result.get('test_loss'))} ({steps})"
            )
        params = ", ".join(f"{k}={_fmtp(v)}" for k, v in t.params.items())
        if t.state == st.TrialState.PRUNED:
            last = max(t.intermediate_values) if t.intermediate_values else None
            val = t.intermediate_values.get(last) if last is not None else None
            text = f"{head} trial {t.number} {params}: pruned at {steps} (val loss {_fmt(val)})"
        else:
            text = f"{head} trial {t.number} {params}: val loss {_fmt(t.value)} ({steps})"
        best = best_trial(study)
        if best is not None:
            text += f"; best {_fmt(best.value)} (trial {best.number})"
        return text


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) and x is not None else "-"


def _fmtp(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# ----------------------------------------------------------------------------- reports


def write_reports(
    out: Path, meta: dict[str, Any], recs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """``tune.md``/``tune.json``, plots and ``best_<method>.yaml`` for the tuning studies; the
    comparison report over a ``runs/`` view for the runs study. ``recs`` is
    :func:`flatlm.lm.study.records` or :func:`flatlm.lm.study.folder_records`."""
    out.mkdir(parents=True, exist_ok=True)
    group = meta.get("group") or _group_of(recs)
    tune = {k.split("/tune/", 1)[1]: v for k, v in recs.items() if "/tune/" in k}
    files: list[str] = []
    table, best = "", {}
    if tune:
        rep = tune_report(out, meta, tune)
        files += rep["files"]
        table += rep["table"]
        best = rep["best"]
    runs = recs.get(f"{group}/runs")
    if runs:
        view_runs(out, meta, runs)
        rep = write_report(out)
        files += rep["files"]
        table += ("\n" if table else "") + rep["table"]
    return {"files": files, "table": table, "best": best}


def _group_of(recs: dict[str, Any]) -> str:
    name = next(iter(recs), "")
    return name.split("/tune/")[0] if "/tune/" in name else name.rsplit("/", 1)[0]


def view_runs(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """``out/runs/<method>-s<seed>/`` from each run's record (result.json, the curves of
    metrics.jsonl, config.json), and ``compare.json``: a comparison folder for
    :func:`flatlm.lm.report.write_report`, whatever machines trained the runs."""
    view = out / "runs"
    if view.is_dir():
        shutil.rmtree(view)
    for r in runs:
        rec = r["record"]
        folder = run_dir(out, r["method"], r["seed"])
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(rec["result"], indent=1))
        (folder / "config.json").write_text(json.dumps(rec["config"], indent=1))
        lines = "".join(json.dumps(m) + "\n" for m in rec["metrics"])
        (folder / "metrics.jsonl").write_text(lines)
    cfg = meta["config"]
    compare_meta = {
        "methods": meta["methods"],
        "seeds": meta["final_seeds"],
        "jobs": None,  # the runs ran on any number of workers and machines
        "device": cfg["train"]["device"],
        "config": cfg,
        # Each method runs at its own tuned settings, and this view holds the study's runs only.
        "per_method_settings": True,
    }
    (out / "compare.json").write_text(json.dumps(compare_meta, indent=1))


def tune_report(
    out: Path, meta: dict[str, Any], tune: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """The trials of every tuned method, the best, the compute spent, plots, best configs."""
    import yaml

    lines = ["# flatlm tune\n"]
    lines.append(
        f"Minimising the final validation loss at seed {meta['tune_seed']}; sampler "
        f"{meta['sampler']}, pruner {meta['pruner']}. Steps run counts every training step "
        "of every finished trial, pruned ones included (a sharpness-aware step costs two "
        "passes, an AdamW step one).\n"
    )
    best: dict[str, Any] = {}
    files: list[str] = []
    summary: dict[str, Any] = {}
    for method, rows in tune.items():
        space = [Param(**{**p, "choices": tuple(p["choices"])}) for p in meta["spaces"][method]]
        keys = [p.key for p in space]
        done = [r for r in rows if r["state"] == "COMPLETE" and _finite(r["value"])]
        top = min(done, key=lambda r: (r["value"], r["number"])) if done else None
        steps_run = sum(int(r["record"]["result"].get("step") or 0) for r in rows)
        full = meta["config"]["train"]["steps"]
        pruned = sum(r["state"] == "PRUNED" for r in rows)
        lines.append(f"## {method}\n")
        lines.append("Search space: " + "; ".join(p.text() for p in space) + ".\n")
        if top is not None:
            chosen = ", ".join(f"{k} = {_fmtp(top['params'][k])}" for k in keys)
            lines.append(
                f"**Best: trial {top['number']}, {chosen}: validation loss {top['value']:.4f}** "
                f"(config: `best_{_safe(method)}.yaml`).\n"
            )
        lines.append(
            f"Compute: {len(rows)} trials ({pruned} pruned), {steps_run} training steps run "
            f"= {steps_run / full:.2f} full runs of {full} steps.\n"
        )
        lines.append("| trial | " + " | ".join(keys) + " | val loss | state | steps run |")
        lines.append("|---|" + "---|" * (len(keys) + 3))
        for r in rows:
            res = r["record"]["result"]
            val = r["value"] if r["state"] == "COMPLETE" else _last_val(r)
            mark = "**" if top is not None and r["number"] == top["number"] else ""
            cells = [str(r["number"]), *(_fmtp(r["params"].get(k)) for k in keys)]
            cells += [f"{mark}{_fmt(val)}{mark}", r["state"].lower(), str(res.get("step"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        plot = _plot_search(out, method, space, rows, top)
        if plot is not None:
            files.append(str(plot))
            lines.append(f"![{plot.stem}]({plot.name})\n")
        if top is not None:
            cfg = with_overrides(one_run(meta["config"], method, meta["tune_seed"]), top["params"])
            path = out / f"best_{_safe(method)}.yaml"
            header = (
                f"# flatlm tune: the best of {len(rows)} trials of {method} (trial "
                f"{top['number']}, validation loss {top['value']:.6g}).\n"
                f"#   flatlm train --config {path.name}\n"
            )
            path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            files.append(str(path))
            best[method] = {
                "trial": top["number"],
                "params": top["params"],
                "value": top["value"],
                "config": path.name,
            }
        summary[method] = {
            "trials": [_trial_row(r) for r in rows],
            "best": best.get(method),
            "steps_run": steps_run,
            "full_run_steps": full,
            "pruned": pruned,
        }
    text = "\n".join(lines) + "\n"
    (out / "tune.md").write_text(text)
    (out / "tune.json").write_text(json.dumps({"meta": meta, "methods": summary}, indent=1))
    files = [str(out / "tune.md"), str(out / "tune.json"), *files]
    return {"files": files, "table": text, "best": best}


def _trial_row(r: dict[str, Any]) -> dict[str, Any]:
    """A trial in tune.json: its summary, the steps it ran and its validation curve."""
    metrics = r["record"]["metrics"]
    val = [[m["step"], m["loss"]] for m in metrics if m.get("split") == "val"]
    row = {k: v for k, v in r.items() if k != "record"}
    return row | {"steps_run": r["record"]["result"].get("step"), "val_curve": val}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _last_val(r: dict[str, Any]) -> float | None:
    vals = [m for m in r["record"]["metrics"] if m.get("split") == "val"]
    return vals[-1]["loss"] if vals else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.=+-" else "_" for c in name)


def _plot_search(
    out: Path, method: str, space: list[Param], rows: list[dict[str, Any]], top: Any
) -> Path | None:
    """Validation loss against each parameter: completed trials filled, pruned ones hollow at
    their last evaluation, the best starred."""
    from flatlm.lm.plots import _pyplot

    if not space or not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(space), figsize=(4.6 * len(space), 3.6), squeeze=False)
    for ax, p in zip(axes[0], space, strict=True):
        for state, style in (("COMPLETE", "o"), ("PRUNED", "o")):
            pts = [
                (r["params"][p.key], r["value"] if state == "COMPLETE" else _last_val(r))
                for r in rows
                if r["state"] == state and p.key in r["params"]
            ]
            pts = [(x, y) for x, y in pts if _finite(y)]
            if pts:
                xs, ys = zip(*pts, strict=True)
                face = "C0" if state == "COMPLETE" else "none"
                ax.scatter(
                    xs, ys, marker=style, facecolors=face, edgecolors="C0", label=state.lower()
                )
        if top is not None:
            ax.scatter(
                [top["params"][p.key]],
                [top["value"]],
                marker="*",
                s=160,
                color="C3",
                label=f"best (trial {top['number']})",
                zorder=3,
            )
        values = [x for x in p.choices if isinstance(x, int | float)]
        wide = (
            len(values) == len(p.choices) > 1
            and min(values) > 0
            and max(values) >= 10 * min(values)
        )
        if p.kind == "log" or wide:  # a listed grid such as 0.02,0.2,2 is read on a log axis
            ax.set_xscale("log")
        ax.set(xlabel=p.key, ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{method}: final validation loss of each trial (pruned: at its last evaluation)",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / f"tune_{_safe(method)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_from_storage(url: str, group: str, out: str | Path) -> dict[str, Any]:
    """``flatlm report --storage URL --study NAME``: the reports from the storage alone."""
    if "://" not in url and not Path(url).is_file():  # a journal to read, never to create
        raise st.StudyError(f"--storage {url}: no such journal file (a study's study.journal)")
    storage = st.open_storage(url, Path(out))
    names = st.study_names(storage, group)
    if not names:
        raise st.StudyError(f"no study {group!r} in {st.redact(url)}")
    meta = st.open_study(storage, names[0], create=False).user_attrs.get(META)
    recs = st.records(storage, group)
    if not any(recs.values()):
        raise st.StudyError(f"study {group!r} has no finished trials yet")
    return write_reports(Path(out), dict(meta) | {"group": group}, recs)


def report_from_folder(folder: str | Path) -> dict[str, Any]:
    """``flatlm report DIR`` on a tune/compare --tune folder: the reports from its run folders."""
    folder = Path(folder)
    meta = json.loads((folder / STUDY_FILE).read_text())
    recs = st.folder_records(folder)
    if not any(recs.values()):
        raise FileNotFoundError(f"no finished trials (trials/*/*/{st.TRIAL_FILE}) in {folder}")
    return write_reports(folder, meta, recs)


def is_study_folder(folder: str | Path) -> bool:
    return (Path(folder) / STUDY_FILE).is_file()


__all__ = [
    "Job",
    "Param",
    "default_space",
    "make_job",
    "parse_param",
    "report_from_folder",
    "report_from_storage",
    "run",
]
