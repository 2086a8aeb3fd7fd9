"""`flatlm tune` and `flatlm compare --tune/--storage`: the study queue on Optuna.

Exactly one finished trial per slot however many workers share a study (two local processes;
two processes on a real PostgreSQL server, one killed with SIGKILL mid-trial; a worker killed at
any point of claiming a trial); a record of any length fits a database column; a study stopped
in the middle of a trial continues to the same numbers as one never stopped; the report written
from the storage alone equals the one written from the run folders; bad input is a one-line
error before anything runs.
"""

from __future__ import annotations

import importlib
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from flatlm import cli
from flatlm.lm import study as st
from flatlm.lm import tune
from flatlm.lm._process import stop_on_signals
from flatlm.lm.config import ConfigError
from helpers.scripts import tiny_cli


def _trials(folder: Path, name: str) -> list:
    storage = st.open_storage(None, folder)
    return st.open_study(storage, name, create=False).get_trials()


def _finished(trials: list) -> list:
    return [t for t in trials if t.state in st.FINISHED]


# ----------------------------------------------------------------------------- search space


def test_param_specs_parse_and_bad_ones_name_the_problem(tiny_cfg):
    p = tune.parse_param("optim.rho=log:0.01:10")
    assert (p.key, p.kind, p.low, p.high) == ("optim.rho", "log", 0.01, 10.0)
    assert tune.parse_param("train.warmup_steps=int:0:40").kind == "int"
    assert tune.parse_param("optim.beta2=float:0.9:0.999").kind == "float"
    assert tune.parse_param("optim.rho=0.02,0.2,2").choices == (0.02, 0.2, 2)
    assert tune.parse_param("optim.method_kwargs.gasam.alpha=cat:-1,1").choices == (-1, 1)
    assert tune.parse_param("optim.rho=.5,1e-3").choices == (0.5, 0.001)  # not TOML, still numbers
    assert tune.parse_param("model.arch=gpt,lstm").choices == ("gpt", "lstm")
    assert tune.parse_param("train.compile=true,false").choices == (True, False)
    for bad, says in [
        ("optim.rho=log:0.01:inf", "finite"),
        ("optim.lr=1,1.0", "listed twice"),
        ("optim.lr=0.1,1e-1", "listed twice"),
        ("optim.rho=log:1:0.1", "empty or inverted range"),
        ("optim.rho=log:1:1", "empty or inverted range"),
        ("optim.rho=log:0:1", "LOW > 0"),
        ("optim.rho=log:1", "LOW:HIGH"),
        ("optim.rho=", "no values"),
        ("optim.rho", "KEY="),
        ("train.steps=int:1.5:3", "whole-number"),
    ]:
        with pytest.raises(ConfigError, match=says):
            tune.parse_param(bad)
    # method-appropriate default: a log range around the method's own radius, none for AdamW
    (rho,) = tune.default_space("sam")
    assert (rho.low, rho.high) == pytest.approx((0.005, 2.5))
    assert tune.default_space("asam")[0].low == pytest.approx(0.05)
    assert tune.default_space("adamw") == []
    cfg = tiny_cfg()
    for params, says in [
        (["optim.rhoo=log:0.1:1"], "unknown config key 'optim.rhoo'"),
        (["optim.lr=log:-1:1"], "LOW > 0"),
        (["optim.lr=float:-1:1"], "optim.lr"),  # a value the config refuses
        (["train.seed=0,1"], "not a setting to tune"),
    ]:
        with pytest.raises(ConfigError, match=says):
            tune.make_job(cfg, "unused", ["sam"], params)
    with pytest.raises(ConfigError, match="fixes rho in its name"):
        tune.make_job(cfg, "unused", ["sam:rho=0.1"], ["optim.rho=log:0.01:1"])
    with pytest.raises(ConfigError, match="nothing to tune"):
        tune.make_job(cfg, "unused", ["adamw"], [])
    with pytest.raises(ConfigError, match="listed values"):
        tune.make_job(cfg, "unused", ["sam"], ["optim.rho=log:0.01:1"], sampler="grid")


def test_a_param_scoped_to_one_method_is_that_methods_space_alone(tiny_cfg):
    """METHOD@KEY=SPEC: bSAM's ρ and lr on their own scales, the shared ρ range for the others,
    AdamW untuned in a comparison."""
    bsam = "bsam:num_data=64"
    params = [
        "optim.rho=log:0.02:1",
        f"{bsam}@optim.lr=log:0.001:1",
        f"{bsam}@optim.rho=log:1e-4:0.1",
    ]
    job = tune.make_job(tiny_cfg(), "unused", ["adamw", "sam", bsam], params, final_seeds=[0, 1])
    ranges = {m: {p["key"]: (p["low"], p["high"]) for p in s} for m, s in job.spaces.items()}
    assert ranges == {
        "adamw": {},
        "sam": {"optim.rho": (0.02, 1.0)},
        bsam: {"optim.lr": (0.001, 1.0), "optim.rho": (1e-4, 0.1)},
    }
    # flatlm tune too: a shared ρ is not AdamW's to tune (its trials would differ in nothing)
    job = tune.make_job(tiny_cfg(), "unused", ["adamw", "sam"], ["optim.rho=log:0.02:1"])
    assert job.spaces["adamw"] == [] and job.tuned() == ["sam"]
    with pytest.raises(ConfigError, match="'gsam' is not one of --methods"):
        tune.make_job(tiny_cfg(), "unused", ["sam"], ["gsam@optim.rho=log:0.1:1"])
    with pytest.raises(ConfigError, match="empty or inverted range"):
        tune.make_job(tiny_cfg(), "unused", ["sam"], ["sam@optim.rho=log:1:0.1"])


@pytest.mark.parametrize(
    ("spec", "first"),
    [("median", 20), ("median:0.5", 50), ("median:0.01", 20), ("hyperband:0.3", 30)],
)
def test_a_pruner_prunes_nothing_before_the_first_evaluation_or_its_fraction(tiny_cfg, spec, first):
    """``NAME:F``: no trial is pruned before F of the steps (nor before the first evaluation);
    the median pruner then compares with the finished trials at the same step."""
    cfg = tiny_cfg()
    cfg.train.steps, cfg.train.eval_every = 100, 20
    job = tune.make_job(cfg, "unused", ["sam"], [], pruner=spec)
    pruner = tune._pruner(job)
    if spec.startswith("median"):
        assert isinstance(pruner, st.optuna.pruners.MedianPruner)
        assert pruner._n_warmup_steps == first and pruner._n_startup_trials == 2
        study = st.optuna.create_study(pruner=pruner)
        for value in (1.0, 1.0):  # two finished trials with a low loss at every step
            t = study.ask()
            for step in range(20, 101, 20):
                t.report(value, step)
            study.tell(t, value)
        worse = study.ask()
        pruned_at = None
        for step in range(20, 101, 20):
            worse.report(2.0, step)
            if worse.should_prune():
                pruned_at = step
                break
        assert pruned_at == next(s for s in range(20, 101, 20) if s >= first)
    else:
        assert isinstance(pruner, st.optuna.pruners.HyperbandPruner)
        assert pruner._min_resource == first and pruner._max_resource == 100


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--param", "optim.rhoo=log:0.1:1"], "unknown config key 'optim.rhoo'"),
        (["--param", "optim.rho=log:2:1"], "empty or inverted range"),
        (["--storage", "postgresql://flatlm:pw@127.0.0.1:9/none"], "cannot open storage"),
        (["--sampler", "cmaes"], "--sampler must be one of"),
        (["--pruner", "median:1"], "fraction of the steps before which nothing is pruned"),
        (["--pruner", "none:0.5"], "only for median or hyperband"),
        (["--pruner", "median:half"], "in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(corpus_file, tmp_path, capsys, args, says):
    out = tmp_path / "t"
    argv = ["tune", "--data", str(corpus_file), "--preset", "quick", "--method", "sam"]
    code = cli.main([*argv, "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_ERROR and says in err and len(err.splitlines()) == 1, err
    assert "pw@" not in err  # the password is not printed
    assert not (out / "trials").exists()


def test_a_report_from_a_journal_that_is_not_there_creates_nothing(tmp_path, capsys):
    path = tmp_path / "typo" / "study.jornal"
    argv = ["report", "--storage", str(path), "--study", "s", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == cli.EXIT_ERROR
    assert "no such journal file" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists() and not (tmp_path / "r").exists()


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    monkeypatch.delitem(sys.modules, "flatlm.lm.study")
    with pytest.raises(ImportError, match=r"pip install 'flatlm\[lm\]'"):
        importlib.import_module("flatlm.lm.study")


# ----------------------------------------------------------------------------- one worker


class StopAfter:
    """A stop flag that sets itself at its ``n``-th look: an interrupt at a fixed point."""

    def __init__(self, n: int) -> None:
        self.n, self.looks, self._set = n, 0, False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        self.looks += 1
        self._set = self._set or self.looks >= self.n
        return self._set


def test_a_step_policys_options_are_tuned_for_that_method_alone(tiny_cfg, tmp_path):
    """LookSAM's every and looksam_alpha live in [optim.method_kwargs.sam], which plain SAM
    (compared beside it, and in the config's compare.methods) does not take: scoped to LookSAM
    they are checked against it alone, each trial runs with the values drawn, and the best
    config holds them and trains to the best trial's validation loss."""
    look = "sam:policy=looksam"
    cfg = tiny_cfg(train__steps=6, train__eval_every=3)
    assert "sam" in cfg.compare.methods
    params = [
        f"{look}@optim.method_kwargs.sam.every=int:2:4",
        f"{look}@optim.method_kwargs.sam.looksam_alpha=float:0.3:0.9",
        f"{look}@optim.rho=log:0.01:1",
    ]
    job = tune.make_job(cfg, tmp_path, ["sam", look], params, trials=3, pruner="none", quiet=True)
    tune.run(job)
    trials = _finished(_trials(tmp_path, f"tune/tune/{look}"))
    assert len(trials) == 3
    for t in trials:
        every = t.params["optim.method_kwargs.sam.every"]
        counts = st.get_record(t)["result"]["step_counts"]
        assert counts == {
            "fresh": math.ceil(6 / every),
            "reuse": 6 - math.ceil(6 / every),
            "plain": 0,
        }
    best = min(trials, key=lambda t: t.value)
    code = cli.main(
        ["train", "--config", str(tmp_path / "best_sam_policy=looksam.yaml"), "--quiet",
         "--out", str(tmp_path / "again")]
    )  # fmt: skip
    assert code == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["val_loss"] == best.value


def test_compare_tune_takes_a_policys_required_option_from_its_param(corpus_file, tmp_path, capsys):
    """LookSAM needs `every`: given only as its --param, `compare --tune` checks and runs it with
    it (2 fresh steps of 6 at every = 3); without it, a one-line error before anything runs."""
    look = "sam:policy=looksam"
    argv = tiny_cli("compare", corpus_file, "--tune", "--methods", "adamw", look, "--seeds", "0",
                    "--trials", "1", "--quiet", train__steps="6")[3:]  # fmt: skip
    every = ["--param", f"{look}@optim.method_kwargs.sam.every=3"]
    assert cli.main([*argv, "--out", str(tmp_path / "bad")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert "step policy 'looksam' needs every" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad" / "trials").exists()
    assert cli.main([*argv, *every, "--out", str(tmp_path / "ok")]) == 0
    result = json.loads(
        (tmp_path / "ok" / "runs" / "sam_policy=looksam-s0" / "result.json").read_text()
    )
    assert result["step_counts"] == {"fresh": 2, "reuse": 4, "plain": 0}


def test_a_trial_that_raises_in_a_worker_fails_the_command(corpus_file, tmp_path, capsys):
    """With two worker processes a trial's error ends its worker, not the command: the command
    still exits non-zero naming the trial and its error (as one worker does by raising)."""
    argv = tiny_cli("tune", corpus_file, "--method", "sam", "--sampler", "grid", "--param",
                    "model.block_size=16,100000", "--pruner", "none", "--jobs", "2", "--quiet",
                    train__steps="4")[3:]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "t")]) == cli.EXIT_FAILED
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "not everything ran" in err[0] and "block_size+1 = 100001" in err[0], (
        err
    )
    assert (tmp_path / "t" / "best_sam.yaml").is_file()  # the trial that ran is reported


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_comparison_refuses_a_new_best_its_runs_never_used(tiny_cfg, tmp_path, jobs):
    """compare --tune continued with more trials: a new best would leave the runs at the old
    best's settings under a report of the new one. It is refused, naming both, once the new
    trials have run (they stay in the study)."""
    cfg = tiny_cfg(train__steps=4)
    kw = {"pruner": "none", "final_seeds": [0, 1], "quiet": True}
    tune.run(tune.make_job(cfg, tmp_path, ["adamw", "sam"], [], trials=2, **kw))
    runs = {t.user_attrs["slot"]: t for t in _trials(tmp_path, "compare/runs")}
    first = runs["sam s1"].user_attrs["overrides"]
    more = tune.make_job(cfg, tmp_path, ["adamw", "sam"], [], trials=6, **kw)
    trials = _finished(_trials(tmp_path, "compare/tune/sam"))
    best_of_2 = min(trials, key=lambda t: (t.value, t.number))
    assert first == best_of_2.params
    if jobs == 1:
        with pytest.raises(st.StudyError, match="trials were added after the runs started"):
            tune.run(more)  # the 4 new trials (seeded per trial) draw a better rho
    else:  # raised in the workers: the run says they failed (the command exits 1)
        (failed,) = tune.run(more, jobs=2)["failed"]
        assert "worker process(es) ended with exit codes [1, 1]" in failed
    trials = _finished(_trials(tmp_path, "compare/tune/sam"))
    assert len(trials) == 6
    assert min(trials, key=lambda t: (t.value, t.number)).number != best_of_2.number


def test_a_comparison_whose_tuning_trial_raised_ends_instead_of_waiting(corpus_file, tmp_path):
    """compare --tune on two workers, one tuning trial of SAM raising: SAM's runs wait for
    every tuning slot, so the workers must end (not wait for ever) once nothing more can run;
    the command exits 1 naming the trial, AdamW's runs done, and the same command runs it again."""
    argv = tiny_cli("compare", corpus_file, "--tune", "--methods", "adamw", "sam", "--seeds", "0",
                    "--sampler", "grid", "--param", "sam@model.block_size=16,100000", "--pruner",
                    "none", "--jobs", "2", "--quiet", "--out", str(tmp_path), train__steps="4")  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == cli.EXIT_FAILED, done.stderr[-2000:]
    assert "not everything ran" in done.stderr and "block_size+1 = 100001" in done.stderr
    runs = {t.user_attrs["slot"]: t.state for t in _trials(tmp_path, "compare/runs")}
    assert runs == {"adamw s0": st.TrialState.COMPLETE}


def test_interrupted_study_continues_to_the_same_trials(tiny_cfg, tmp_path):
    """Stopped in the middle of a trial, the study re-enqueues it; the same command then resumes
    that run from its checkpoint, and every trial ends as in a study never stopped (TPE seeded
    per trial, resume bit for bit). Pruned trials count their steps in the compute."""
    cfg = tiny_cfg(train__steps=8, train__eval_every=2)
    kwargs = {"trials": 5, "pruner": "median", "quiet": True}
    whole = tune.make_job(cfg, tmp_path / "whole", ["sam"], [], **kwargs)
    assert not tune.run(whole)["stopped"]
    parts = tune.make_job(cfg, tmp_path / "parts", ["sam"], [], **kwargs)
    storage = st.open_storage(None, tmp_path / "parts")
    stop = StopAfter(12)  # the worker loop, then each training step: trial 1, step 2
    with stop_on_signals(stop):
        tune.work(parts, stop)
    trials = _trials(tmp_path / "parts", "tune/tune/sam")
    failed = [t for t in trials if t.state == st.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["resume_dir"]
    waiting = [t for t in trials if t.state == st.TrialState.WAITING]
    retry = next(t for t in waiting if t.system_attrs.get("failed_trial") == failed[0].number)
    assert retry.params == failed[0].params
    stopped_at = json.loads((Path(failed[0].user_attrs["run_dir"]) / "result.json").read_text())
    assert stopped_at["status"] == "interrupted" and 0 < stopped_at["step"] < 8
    del storage

    report = tune.run(parts)  # the same command again
    assert not report["stopped"]
    a = _finished(_trials(tmp_path / "whole", "tune/tune/sam"))
    b = _finished(_trials(tmp_path / "parts", "tune/tune/sam"))
    assert len(a) == len(b) == 5
    key = lambda t: t.user_attrs["slot"]  # noqa: E731
    for x, y in zip(sorted(a, key=key), sorted(b, key=key), strict=True):
        assert x.params == y.params and x.state == y.state
        assert x.value == y.value and x.intermediate_values == y.intermediate_values
    resumed = next(t for t in b if t.system_attrs.get("failed_trial") == failed[0].number)
    assert resumed.user_attrs["run_dir"] == failed[0].user_attrs["run_dir"]  # continued there
    summary = json.loads((tmp_path / "parts" / "tune.json").read_text())["methods"]["sam"]
    steps = [st.get_record(t)["result"]["step"] for t in b]
    assert summary["steps_run"] == sum(steps)
    assert any(t.state == st.TrialState.PRUNED for t in b)  # the median pruner stopped one
    assert min(steps) < 8
    # the best config trains to the best trial's validation loss as it is
    best = min((t for t in b if t.state == st.TrialState.COMPLETE), key=lambda t: t.value)
    code = cli.main(
        ["train", "--config", str(tmp_path / "parts" / "best_sam.yaml"), "--quiet",
         "--out", str(tmp_path / "again")]
    )  # fmt: skip
    assert code == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["val_loss"] == best.value

    # a study made with another config is refused, naming the difference
    other = tune.make_job(tiny_cfg(train__steps=8, optim__lr=0.01), tmp_path / "parts", ["sam"], [])
    with pytest.raises(st.StudyError, match=r"optim\.lr = 0\.001 there, 0\.01 now"):
        tune.run(other)


def test_a_trial_taken_for_dead_while_running_is_counted_once(tiny_cfg, tmp_path, monkeypatch):
    """A worker whose heartbeat came late finds, at its next evaluation, its trial failed by
    another worker (and re-enqueued): it stops, writes nothing more to the study, and the study
    still ends with one complete trial for the slot, at the same parameters."""
    import threading

    from flatlm.lm import train as train_module

    job = tune.make_job(
        tiny_cfg(), tmp_path / "t", ["sam"], [], trials=1, pruner="none", quiet=True
    )
    storage = st.open_storage(None, tmp_path / "t")
    study = tune.setup(job, storage)["tune/tune/sam"]
    trial = st.pop_trial(study)
    real_train = train_module.train

    def train_then_taken_for_dead(*args, on_eval=None, **kwargs):
        def late(step, val):  # another worker fails it as stale, as fail_stale_trials does
            if study.get_trials()[0].state == st.TrialState.RUNNING:
                storage.set_trial_state_values(trial._trial_id, st.TrialState.FAIL)
                st._Retry(inherit_intermediate_values=True)(
                    study, storage.get_trial(trial._trial_id)
                )
            return on_eval(step, val)

        return real_train(*args, on_eval=late, **kwargs)

    monkeypatch.setattr(train_module, "train", train_then_taken_for_dead)
    tune.run_trial(job, storage, study, trial, threading.Event())  # must not raise
    monkeypatch.setattr(train_module, "train", real_train)
    dead = study.get_trials()[0]
    assert dead.state == st.TrialState.FAIL and st.get_record(dead) is None
    stopped = json.loads((Path(dead.user_attrs["run_dir"]) / "result.json").read_text())
    assert stopped["status"] == "pruned" and "taken for dead" in stopped["reason"]
    assert not (Path(dead.user_attrs["run_dir"]) / st.TRIAL_FILE).exists()
    assert not tune.run(job)["stopped"]
    trials = study.get_trials()
    assert [t.state for t in trials] == [st.TrialState.FAIL, st.TrialState.COMPLETE]
    assert trials[1].params == dead.params


# ----------------------------------------------------------------------------- two workers


def test_two_local_workers_tune_then_compare_exactly_once(tiny_cfg, tmp_path):
    """`compare --tune` with two worker processes on the default (journal) storage: exactly
    N tuning trials, then every (method, seed) once, the tuning seed's sam run being the best
    trial; the report from the storage equals the one from the run folders."""
    cfg = tiny_cfg(train__steps=4)
    out = tmp_path / "cmp"
    job = tune.make_job(
        cfg, out, ["adamw", "sam"], [], trials=4, pruner="none", final_seeds=[0, 1], quiet=True
    )
    report = tune.run(job, jobs=2)
    assert not report["stopped"]
    trials = _trials(out, "compare/tune/sam")
    assert len(trials) == 4 and all(t.state == st.TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["slot"] for t in trials) == ["0", "1", "2", "3"]
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == 4 and all((Path(d) / "result.json").is_file() for d in dirs)
    runs = _trials(out, "compare/runs")
    assert sorted(t.user_attrs["slot"] for t in runs) == [
        "adamw s0",
        "adamw s1",
        "sam s0",
        "sam s1",
    ]
    assert all(t.state == st.TrialState.COMPLETE for t in runs)
    best = min(trials, key=lambda t: (t.value, t.number))
    sam0 = next(t for t in runs if t.user_attrs["slot"] == "sam s0")
    assert sam0.value == best.value and sam0.user_attrs["kind"] == "reuse"
    sam1 = next(t for t in runs if t.user_attrs["slot"] == "sam s1")
    assert sam1.user_attrs["overrides"] == best.params
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"adamw", "sam"} and "sam" in results["deltas_vs_adamw"]

    from_storage = {p: (out / p).read_text() for p in ("tune.md", "results.md")}
    from_json = json.loads((out / "results.json").read_text())
    assert cli.main(["report", str(out)]) == 0  # from the run folders
    assert {p: (out / p).read_text() for p in from_storage} == from_storage
    assert json.loads((out / "results.json").read_text()) == from_json


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres(tmp_path_factory):
    """A PostgreSQL server of its own (pgserver), its URL; skipped if it cannot start here."""
    pgserver = pytest.importorskip("pgserver", reason="pgserver (flatlm[tune-postgres])")
    pytest.importorskip("psycopg", reason="psycopg (flatlm[tune-postgres])")
    error = None
    for _ in range(2):  # a second try in a fresh folder: initdb can fail on a busy machine
        try:
            server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
            break
        except Exception as e:  # pragma: no cover - depends on the machine
            error = e
    else:
        pytest.skip(f"the PostgreSQL server (pgserver) cannot start on this machine: {error}")
    yield server.get_uri()
    server.cleanup()


@pytest.mark.slow
def test_postgres_two_workers_one_killed_mid_trial(postgres, corpus_file, tmp_path):
    url, n = postgres, 4
    out = tmp_path / "tune"
    args = ["--method", "sam", "--trials", str(n), "--pruner", "none", "--storage", url,
            "--study", "s", "--heartbeat", "2", "--out", str(out), "--quiet"]  # fmt: skip
    argv = tiny_cli("tune", corpus_file, *args, train__steps="150", train__checkpoint_every="0")
    workers = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    storage = st.open_storage(url, tmp_path)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline:
            killed = _kill_one_mid_trial(storage, workers)
            time.sleep(0.05)
        assert killed is not None, "no trial was caught running"
        survivor = next(w for w in workers if w.returncode is None)
        _, err = survivor.communicate(timeout=400)
        assert survivor.returncode == 0, err
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    study = st.open_study(storage, "s/tune/sam", create=False)
    trials = study.get_trials()
    done = [t for t in trials if t.state == st.TrialState.COMPLETE]
    assert len(done) == n
    assert sorted(t.user_attrs["slot"] for t in done) == [str(i) for i in range(n)]  # once each
    failed = [t for t in trials if t.state == st.TrialState.FAIL]
    assert killed in [t.number for t in failed] and len(trials) == n + len(failed)
    # Each failed trial was re-run in a folder of its own: the killed one, and any whose
    # heartbeat the other worker found late on this busy machine (its own tell then fails).
    seen = [(t.number, t.state.name, t.user_attrs, t.system_attrs) for t in trials]
    for dead in failed:
        reruns = [t for t in done if dead.number in t.system_attrs.get("retry_history", [])]
        assert len(reruns) == 1, f"trial {dead.number} failed and was not re-run once: {seen}"
        rerun = reruns[0]
        assert rerun.params == dead.params and rerun.user_attrs["slot"] == dead.user_attrs["slot"]
        assert rerun.user_attrs["run_dir"] != dead.user_attrs["run_dir"]

    # the report from the database alone equals the one from the run folders
    assert cli.main(["report", "--storage", url, "--study", "s", "--out", str(tmp_path / "r")]) == 0
    assert cli.main(["report", str(out)]) == 0
    assert (tmp_path / "r" / "tune.md").read_text() == (out / "tune.md").read_text()
    db = json.loads((tmp_path / "r" / "tune.json").read_text())["methods"]
    folders = json.loads((out / "tune.json").read_text())["methods"]
    assert db == folders and len(db["sam"]["trials"]) == n


def _kill_one_mid_trial(storage, workers) -> int | None:
    """SIGKILL the worker of a running trial that has started training, and return the
    trial's number; None if no trial is running. The worker is stopped (SIGSTOP) first and
    the trial checked again, so it cannot finish between the look and the kill."""
    names = st.study_names(storage, "s")
    if not names:
        return None
    study = st.open_study(storage, names[0], create=False)
    for t in study.get_trials(states=(st.TrialState.RUNNING,)):
        run_dir = t.user_attrs.get("run_dir")
        victim = next((w for w in workers if w.pid == t.user_attrs.get("pid")), None)
        if victim is None or not run_dir or not (Path(run_dir) / "config.json").is_file():
            continue
        victim.send_signal(signal.SIGSTOP)
        if study.get_trials(states=(st.TrialState.RUNNING,)) and any(
            x.number == t.number for x in study.get_trials(states=(st.TrialState.RUNNING,))
        ):
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            return t.number
        victim.send_signal(signal.SIGCONT)
    return None


# ----------------------------------------------------------------------------- the storage


@pytest.fixture(params=["journal", "sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def storage_url(request, tmp_path) -> str:
    """A storage URL of each kind: the journal file, a database (sqlite file, PostgreSQL)."""
    if request.param == "journal":
        return str(tmp_path / st.JOURNAL)
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres")


class Killed(BaseException):
    """A worker's kill -9: nothing after the point it strikes runs, nothing is cleaned up."""


def _dies_after(storage, writes: int) -> None:
    """Make this worker's ``storage`` raise :class:`Killed` right after its ``writes``-th
    heartbeat or state change: a worker killed at that point of claiming a trial."""
    done: list[str] = []
    for name in ("record_heartbeat", "set_trial_state_values"):
        real = getattr(storage, name)

        def write(*args, real=real, name=name, **kwargs):
            out = real(*args, **kwargs)
            done.append(name)
            if len(done) == writes:
                raise Killed(f"killed after {done}")
            return out

        setattr(storage, name, write)


@pytest.mark.parametrize("writes", [1, 2])
def test_a_worker_killed_while_claiming_a_trial_leaves_nothing_stuck(storage_url, tmp_path, writes):
    """A worker killed after each write of its claim (heartbeat, state change, in whatever
    order) leaves its trial waiting, or running with a heartbeat that goes stale: another worker
    runs the slot (the trial itself, or its retry after the grace period), and the study ends
    with exactly one complete trial per slot. A running trial without a heartbeat row would be
    stuck for ever: Optuna's database storage never takes it for stale."""
    dying = st.open_storage(storage_url, tmp_path, heartbeat_s=1)
    study = st.open_study(dying, "g/runs")
    st.add_slots(study, [{"slot": "a"}, {"slot": "b"}])
    _dies_after(dying, writes)
    with pytest.raises(Killed):
        st.pop_trial(study)
    del dying, study

    storage = st.open_storage(storage_url, tmp_path, heartbeat_s=1)  # another worker
    study = st.open_study(storage, "g/runs", create=False)
    victim = study.get_trials()[0]
    assert victim.user_attrs["slot"] == "a" and victim.state in (
        st.TrialState.WAITING,
        st.TrialState.RUNNING,
    )
    deadline = time.monotonic() + 30  # the grace period is 2 s (the sqlite clock ticks in s)
    while not st.settled(study) and time.monotonic() < deadline:
        trial = st.pop_trial(study)
        if trial is None:
            time.sleep(0.25)
        else:
            study.tell(trial, float(trial.number))
    trials = study.get_trials()
    stuck = [(t.number, t.state.name) for t in trials if not t.state.is_finished()]
    assert st.settled(study), f"left unfinished for good: {stuck}"
    done = [t for t in trials if t.state == st.TrialState.COMPLETE]
    assert sorted(t.user_attrs["slot"] for t in done) == ["a", "b"]  # once each
    a = next(t for t in done if t.user_attrs["slot"] == "a")
    if victim.state == st.TrialState.RUNNING:  # killed once running: its retry ran the slot
        assert trials[0].state == st.TrialState.FAIL
        assert a.system_attrs["failed_trial"] == victim.number
    else:  # killed before: the trial itself ran
        assert a.number == victim.number


def test_a_trial_is_claimed_by_one_worker_of_two(storage_url, tmp_path):
    """Two workers claiming the same waiting trial: one gets it; the loser's heartbeat on it is
    harmless (the winner's trial is not taken for stale)."""
    one, two = (st.open_storage(storage_url, tmp_path, heartbeat_s=1) for _ in range(2))
    study = st.open_study(one, "g/runs")
    st.add_slots(study, [{"slot": "a"}])
    trial_id = study.get_trials()[0]._trial_id
    assert st.claim(one, trial_id) is True
    assert st.claim(two, trial_id) is False
    assert st.pop_trial(study) is None  # a look for work neither fails it nor gets it
    assert one.get_trial(trial_id).state == st.TrialState.RUNNING


def test_a_claim_left_without_its_time_expires(storage_url, tmp_path, monkeypatch):
    """A worker killed (or interrupted) between creating its claim and stamping its time left a
    marker that read as fresh for ever, so every later start waited for good: it now ages from
    when a worker first sees it, and the slots are enqueued once it is CLAIM_WAIT_S old."""
    storage = st.open_storage(storage_url, tmp_path, heartbeat_s=1)
    study = st.open_study(storage, "g/runs")
    st.optuna.create_study(storage=storage, study_name="g/runs#claim-0")  # no "at", not done
    monkeypatch.setattr(st, "CLAIM_WAIT_S", 0.5)
    started, added = time.monotonic(), []
    look = threading.Thread(
        target=lambda: added.append(st.add_slots(study, [{"slot": "a"}, {"slot": "b"}])),
        daemon=True,
    )
    look.start()
    look.join(timeout=30)
    assert added == [2], "add_slots still waiting on the claim after 30 s"
    assert time.monotonic() - started >= 0.5
    assert sorted(t.user_attrs["slot"] for t in study.get_trials()) == ["a", "b"]


def test_slots_enqueued_by_another_worker_during_the_look_are_not_enqueued_twice(
    storage_url, tmp_path, monkeypatch
):
    """Two workers starting at once: the second finds a slot missing, then the first enqueues
    it and marks its claim done before the second lists the claims. The second must look
    again after winning its own claim; enqueuing the slot twice left a trial to be dropped
    unrun (a failed trial that no retry answers)."""
    slots = [{"slot": "a"}, {"slot": "b"}]
    first, second = (st.open_storage(storage_url, tmp_path, heartbeat_s=1) for _ in range(2))
    study = st.open_study(second, "g/runs")
    real_names, interleaved = st.study_names, []

    def names_after_the_first_worker(storage, group, *, claims=False):
        if claims and not interleaved:  # between the second worker's two looks
            interleaved.append(None)
            interleaved[0] = st.add_slots(st.open_study(first, "g/runs", create=False), slots)
        return real_names(storage, group, claims=claims)

    monkeypatch.setattr(st, "study_names", names_after_the_first_worker)
    assert st.add_slots(study, slots) == 0 and interleaved == [2]
    trials = study.get_trials()
    assert sorted(t.user_attrs["slot"] for t in trials) == ["a", "b"]


MYSQL_TEXT = 65_535  # bytes a MySQL TEXT column holds


def _long_record(steps: int) -> dict:
    """A run record shaped as :func:`flatlm.lm.study.run_record` writes one: the train loss at
    every step, the validation loss every 100; text that JSON escapes, and non-ASCII."""
    metrics = [{"step": s, "split": "train", "loss": 7.0 / (1 + s) ** 0.3} for s in range(steps)]
    metrics += [
        {"step": s, "split": "val", "loss": 6.0 / (1 + s) ** 0.2} for s in range(0, steps, 100)
    ]
    result = {"status": "completed", "step": steps, "val_loss": metrics[-1]["loss"]}
    config = {"optim": {"method": "sam", "rho": 0.05}, "note": 'a "quoted" \\path\\ ρ ∇ \n'}
    return {"result": result, "metrics": metrics, "config": config}


def test_a_rerun_keeps_its_slot_against_a_duplicate_enqueued_while_it_was_requeued(
    storage_url, tmp_path
):
    """A trial going back to the queue is failed, then its re-run enqueued; another worker's
    add_slots in between enqueues the slot again. The re-run (which resumes from the
    checkpoint) must keep the slot and the duplicate be dropped, not the other way round."""
    storage = st.open_storage(storage_url, tmp_path, heartbeat_s=1)
    study = st.open_study(storage, "g/runs")
    st.add_slots(study, [{"slot": "a"}])
    trial = st.pop_trial(study)
    trial.set_user_attr("resume_dir", "somewhere")
    frozen = study.tell(trial, state=st.TrialState.FAIL)  # requeue's first write
    assert st.add_slots(study, [{"slot": "a"}]) == 1  # the other worker, in the window
    st._Retry(inherit_intermediate_values=True)(study, frozen)  # requeue's second write
    kept = st.pop_trial(study)
    assert kept.user_attrs["resume_dir"] == "somewhere"
    assert st.pop_trial(study) is None  # the duplicate, dropped unrun
    states = {t.number: (t.state.name, t.user_attrs.get("dropped")) for t in study.get_trials()}
    assert states[1] == ("FAIL", f"slot 'a' is trial {kept.number}'s"), states


def test_a_long_record_is_stored_in_chunks_a_mysql_column_holds(storage_url, tmp_path):
    """A record of > 200 kB round-trips exactly through the storage, read from it alone, and no
    stored attribute exceeds what a MySQL TEXT column holds (a database stores each as its
    JSON text); a study written before (one ``record`` attribute) still reads."""
    record = _long_record(4000)
    assert len(json.dumps(record)) > 200_000
    storage = st.open_storage(storage_url, tmp_path, heartbeat_s=1)
    study = st.open_study(storage, "g/runs")
    st.add_slots(study, [{"slot": "a"}, {"slot": "old"}])
    trial = st.pop_trial(study)
    st.set_record(trial, record)
    study.tell(trial, 1.0)
    old = st.pop_trial(study)
    old.set_user_attr("record", _long_record(3))  # as studies before chunking stored it
    study.tell(old, 2.0)

    fresh = st.open_storage(storage_url, tmp_path, heartbeat_s=1)  # another machine
    rows = st.records(fresh, "g")["g/runs"]
    assert [r["slot"] for r in rows] == ["a", "old"]
    assert rows[0]["record"] == record and rows[1]["record"] == _long_record(3)
    frozen = st.open_study(fresh, "g/runs", create=False).get_trials()[0]
    assert st.get_record(frozen) == record and frozen.user_attrs["record#n"] > 1
    sizes = [len(json.dumps(v).encode()) for v in frozen.user_attrs.values()]
    if "://" in storage_url:  # what the database holds
        import sqlalchemy

        with fresh.engine.connect() as db:
            rows = db.execute(sqlalchemy.text("SELECT value_json FROM trial_user_attributes"))
            sizes += [len(v.encode()) for (v,) in rows]
    assert max(sizes) <= 2 * st.RECORD_CHUNK + 2 < MYSQL_TEXT
    # a record cut short (a worker killed while writing it) is not read as one
    assert st.get_record(type("T", (), {"user_attrs": {"record#0": "{"}})()) is None
