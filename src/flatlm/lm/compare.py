"""Run one config under several methods and seeds (the sweep behind ``flatlm compare``).

Every (method, seed) trains into ``runs/<method>-s<seed>/`` of the comparison folder
(:func:`flatlm.lm.report.run_dir`), one at a time or in a pool of spawned processes; Ctrl-C lets
running runs checkpoint and starts no new ones. With ``resume`` a finished run is reused and an
interrupted one continued, but only if it was made with the same settings. The report
(:func:`flatlm.lm.report.write_report`) is written at the end.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import signal
from pathlib import Path
from typing import Any

from flatlm.lm._process import stop_on_signals
from flatlm.lm.config import RunConfig, config_from_dict
from flatlm.lm.data import prepare_corpus
from flatlm.lm.report import run_dir, write_report
from flatlm.lm.train import train

_STOP: Any = None  # in workers: the parent's "stop" event (set on Ctrl-C)


def _init_worker(stop: Any) -> None:
    """Workers ignore Ctrl-C between runs; during a run ``train`` handles it (checkpoint, return)."""
    global _STOP
    _STOP = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(task: tuple[dict[str, Any], str, bool, bool]) -> dict[str, Any]:
    """Worker: one training run (module-level so ``spawn`` processes can pickle it)."""
    cfg_dict, out, quiet, resume = task
    if _STOP is not None and _STOP.is_set():
        return {"status": "not started"}
    cfg = config_from_dict(cfg_dict)
    out_path = Path(out)
    if resume:
        _check_same_run(out_path, cfg_dict)
    result = _result(out_path) if resume else {}
    if result.get("status") == "completed" and result["steps"] == cfg.train.steps:
        return result
    resume = resume and (out_path / "checkpoint.pt").is_file()
    return train(cfg, out_path, resume=resume, quiet=quiet)


# Settings that do not change what a run computes: a resumed comparison may differ in these.
_RESUME_FREE = {("train", "threads"), ("train", "log_every"), ("train", "checkpoint_every")}


def _check_same_run(out: Path, wanted: dict[str, Any]) -> None:
    """Refuse to resume (or reuse) a run made with other settings, naming them: otherwise a
    changed config under ``--resume`` would silently keep the old runs."""
    path = out / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    diffs = [
        f"{section}.{key} = {saved.get(section, {}).get(key)!r} there, {value!r} now"
        for section, values in wanted.items()
        if section != "compare"
        for key, value in values.items()
        if (section, key) not in _RESUME_FREE and saved.get(section, {}).get(key) != value
    ]
    if diffs:
        raise ValueError(
            f"cannot resume {out}: it was run with other settings ({'; '.join(diffs)}); "
            "use another --out, or drop --resume to start the comparison afresh"
        )


def compare(
    cfg: RunConfig,
    out_dir: str | Path,
    methods: list[str],
    seeds: list[int],
    *,
    jobs: int = 1,
    quiet: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every (method, seed) with otherwise identical settings; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_corpus(cfg.data)  # tokenise once here, so parallel workers only read the cache
    # Under torchrun every rank runs this loop, one distributed run at a time; rank 0 writes.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        jobs = 1
    jobs = max(1, min(jobs, len(methods) * len(seeds)))
    tasks = []
    for method in methods:
        for seed in seeds:
            c = copy.deepcopy(cfg)
            c.optim.method, c.train.seed = method, seed
            if c.train.threads == 0:  # share the cores instead of oversubscribing them
                c.train.threads = max(1, (os.cpu_count() or 1) // jobs)
            tasks.append((c.to_dict(), str(run_dir(out, method, seed)), quiet or jobs > 1, resume))
    # Longest first (sharpness-aware steps cost two passes): better packing across workers.
    tasks.sort(key=lambda t: t[0]["optim"]["method"] == "adamw")
    # jobs > 1: the runs shared the cores (or the GPU), which the report says beside step times.
    meta = {"methods": methods, "seeds": seeds, "jobs": jobs, "device": cfg.train.device}
    if main_rank:
        (out / "compare.json").write_text(json.dumps(meta | {"config": cfg.to_dict()}, indent=1))
    if jobs == 1:
        for t in tasks:
            if _run(t)["status"] != "completed":  # Ctrl-C: train checkpointed; stop here
                break
    else:
        _run_pool(tasks, jobs)
    if not main_rank:  # rank 0 writes the runs' results and the report
        return {"summary": {}, "table": "", "plots": [], "missing": []}
    missing = [t[1] for t in tasks if _result(Path(t[1])).get("status") != "completed"]
    if len(missing) == len(tasks):
        return {"summary": {}, "table": "", "plots": [], "missing": missing}
    return write_report(out) | {"missing": missing}


def _result(run: Path) -> dict[str, Any]:
    """A run dir's ``result.json`` ({} before the run has ended once)."""
    path = run / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _run_pool(tasks: list[tuple[dict[str, Any], str, bool, bool]], jobs: int) -> None:
    """Runs in ``jobs`` spawned processes; the first Ctrl-C lets running runs checkpoint and
    starts no new ones, a second one terminates the workers."""
    ctx = mp.get_context("spawn")
    with stop_on_signals(ctx.Event()) as stop:
        pool = ctx.Pool(jobs, initializer=_init_worker, initargs=(stop,))
        try:
            for _ in pool.imap_unordered(_run, tasks):
                pass
            pool.close()  # let workers exit on their own (no leaked semaphores)
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
