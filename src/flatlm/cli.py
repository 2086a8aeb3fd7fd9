"""The ``flatlm`` command line: ``flatlm train``, ``compare``, ``tune``, ``report``, ``sharpness``,
``methods``.

Adding a subcommand is one decorated function::

    @subcommand("params", "count a run's parameters", arg("run_dir"), arg("--by-layer", action="store_true"))
    def params(args: argparse.Namespace) -> int:
        ...
        return 0
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flatlm.lm.config import RunConfig

Handler = Callable[[argparse.Namespace], int]
EXIT_ERROR, EXIT_DIVERGED, EXIT_STOPPED = 2, 3, 130  # besides 0; main's docstring says when
EXIT_FAILED = 1  # a run's process was killed or crashed (not an interrupt, not bad input)
# Set by `flatlm launch` for its processes: the command that launched them (for the resume
# hint), and a folder where ranks > 0 leave their one-line error instead of printing it.
LAUNCH_COMMAND_ENV, LAUNCH_ERRORS_ENV = "FLATLM_LAUNCH_COMMAND", "FLATLM_LAUNCH_ERRORS"
# name -> (help, argument specs, handler); filled by @subcommand in definition order.
SUBCOMMANDS: dict[str, tuple[str, tuple[tuple[tuple, dict], ...], Handler]] = {}
# Argument groups several subcommands share; refer to them by name in ``arg`` lists.
ARG_GROUPS: dict[str, tuple[tuple[tuple, dict], ...]] = {}


def arg(*flags: str, **kwargs: Any) -> tuple[tuple, dict]:
    """One ``add_argument`` call, written down for later."""
    return flags, kwargs


def subcommand(
    name: str, help: str, *args: tuple[tuple, dict] | str
) -> Callable[[Handler], Handler]:
    """Register ``fn(args) -> exit code`` as ``flatlm NAME``; a str in ``args`` names an ARG_GROUP."""

    def register(fn: Handler) -> Handler:
        specs: list[tuple[tuple, dict]] = []
        for a in args:
            specs.extend(ARG_GROUPS[a] if isinstance(a, str) else [a])
        SUBCOMMANDS[name] = (help, tuple(specs), fn)
        return fn

    return register


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parent / "configs").glob("*.toml"))


def _method_names() -> str:
    from flatlm.optim import METHODS

    return ", ".join(METHODS)


ARG_GROUPS["config"] = (
    arg(
        "--preset",
        help=f"built-in config: {', '.join(PRESETS)} (flatlm/configs/NAME.toml; the main job: quick)",
    ),
    arg("--config", help="a .toml/.yaml config file (overrides the preset)"),
    arg(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=3e-4 (repeatable; wins over files)",
    ),
    arg("--steps", type=int, help="= --set train.steps=N"),
    arg("--device", help="cpu (default) or cuda (bf16 autocast)"),
    arg("--data", help="your own text file or folder instead of the bundled corpus"),
    arg("--encoding", help="of --data (default utf-8); text not valid in it is refused"),
    arg(
        "--include",
        action="append",
        metavar="GLOB",
        help="of a --data folder, only files matching GLOB (name or path in it; repeatable)",
    ),
    arg(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="of a --data folder, leave out files matching GLOB, e.g. '*.gz' (repeatable)",
    ),
    arg(
        "--out",
        help="output folder (default: runs/<preset-or-config>..., with the corpus name and a "
        "short hash of the settings appended when they differ from the preset's)",
    ),
    arg("--resume", action="store_true", help="continue from the checkpoint(s) in --out"),
    arg("--quiet", action="store_true", help="no progress bar"),
)


# The study queue shared by `flatlm tune` and `flatlm compare --tune/--storage` (flatlm.lm.tune).
ARG_GROUPS["study"] = (
    arg(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a setting to tune: KEY=log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or A,B,C "
        "(repeatable; METHOD@KEY=SPEC for one method only; default: optim.rho over a log range "
        "around each method's default)",
    ),
    arg("--trials", type=int, default=20, help="trials per tuned method (default 20)"),
    arg("--sampler", default="tpe", help="tpe (default), random, or grid (the listed values)"),
    arg(
        "--pruner",
        default="median",
        help="median (default), hyperband or none; NAME:F prunes nothing before a fraction F "
        "of the steps (median:0.5 for learning rates, whose early losses mislead)",
    ),
    arg(
        "--storage",
        help="a database URL (postgresql://...) that workers on many machines "
        "share (default: a journal file in --out)",
    ),
    arg("--study", help="the study's name in the storage (default: tune / compare)"),
    arg(
        "--heartbeat",
        type=int,
        default=20,
        help="seconds between a running trial's "
        "heartbeats; a trial silent for twice that is re-run (default 20)",
    ),
)


def _load(args: argparse.Namespace, extra: dict[str, Any]) -> RunConfig:
    """Preset, config file, then the shortcut flags, then ``--set`` (which wins)."""
    from flatlm.lm.config import load_config, parse_override

    flags = {
        "train.steps": args.steps,
        "train.device": args.device,
        "data.corpus": args.data,
        "data.encoding": args.encoding,
        "data.include": args.include,
        "data.exclude": args.exclude,
        **extra,
    }
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    overrides |= dict(parse_override(item) for item in args.overrides)  # --set wins
    return load_config(args.preset, args.config, overrides)


def _resume_command(args: argparse.Namespace, out: str) -> str:
    """The command that was run, with ``--resume`` and ``--out``: settings must match to resume,
    so only the very same command continues the run."""
    argv = list(args.argv)
    if args.out is None:
        argv += ["--out", out]
    if not args.resume:
        argv.append("--resume")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # Under `flatlm launch` its own command; under plain torchrun one that works on one machine.
    launcher = os.environ.get(LAUNCH_COMMAND_ENV) or shlex.join(
        ["torchrun", "--standalone", "--nproc-per-node", str(world), "-m", "flatlm.cli"]
    )
    if world <= 1:
        return shlex.join(["flatlm", *argv])
    return f"{launcher} {shlex.join(argv)}"


def _is_rank_zero() -> bool:
    """Under torchrun only rank 0 speaks for the run (the others hold no run folder)."""
    return os.environ.get("RANK", "0") == "0"


def _run_name(args: argparse.Namespace, cfg: RunConfig) -> str:
    """The default folder's name: the preset's or config file's, and, when the run's settings
    differ from it, the corpus's name and a short hash of those settings, so two runs of other
    settings (two ``--data`` corpora) never share a folder. The method and seed name the run
    folder inside; what a resume may change (more steps, threads, logging) keeps the name."""
    from flatlm.lm._io import safe_name
    from flatlm.lm.config import RESUME_ALLOWED, load_config, setting_changes

    name = Path(args.config).stem if args.config else args.preset or "default"
    plain = load_config(args.preset, args.config)
    ignored = {*RESUME_ALLOWED, "optim.method", "train.seed"}
    diffs = sorted((key, now) for key, _, now in setting_changes(plain, cfg) if key not in ignored)
    if not diffs:
        return safe_name(name)
    if cfg.data.corpus != plain.data.corpus:
        name += "-" + Path(cfg.data.corpus).stem
    digest = hashlib.sha256(json.dumps(diffs, default=repr).encode()).hexdigest()[:6]
    return safe_name(f"{name}-{digest}")


@subcommand(
    "train",
    "train one model with one optimizer method",
    "config",
    arg(
        "--method",
        help=f"optimizer: {_method_names()} (= --set optim.method=); options in the name, e.g. "
        "gasam:alpha=-1; `flatlm methods` lists each one's options and defaults",
    ),
    arg("--seed", type=int, help="= --set train.seed=N"),
)
def cmd_train(args: argparse.Namespace) -> int:
    from flatlm.lm.train import train

    cfg = _load(args, {"optim.method": args.method, "train.seed": args.seed})
    from flatlm.lm._io import safe_name

    run = f"{safe_name(cfg.optim.method)}-s{cfg.train.seed}"
    out = args.out or f"runs/{_run_name(args, cfg)}/{run}"
    result = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if not _is_rank_zero():  # the same exit code as rank 0, without its messages
        return {"completed": 0, "diverged": EXIT_DIVERGED}.get(result["status"], EXIT_STOPPED)
    if result["status"] == "diverged":
        print(
            f"flatlm train: {cfg.optim.method} seed {cfg.train.seed} diverged: {result['reason']} "
            f"(result.json in {out} has status 'diverged')",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    if result["status"] != "completed":
        print(f"stopped at step {result['step']} ({result['status']}); resume with:")
        print(f"  {_resume_command(args, out)}")
        return EXIT_STOPPED
    print(
        f"{cfg.optim.method} seed {cfg.train.seed}: {result['step']} steps, "
        f"val loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.2f}), "
        f"test loss {result['test_loss']:.4f} (ppl {result['test_ppl']:.2f}), "
        f"{1000 * result['time_per_step_s']:.1f} ms/step -> {out}"
    )
    return 0


@subcommand(
    "compare",
    "run the same config with several methods and seeds; write a table and plots",
    "config",
    arg(
        "--methods",
        nargs="+",
        help=f"of {_method_names()}; default: the config's compare.methods; options "
        "allowed, e.g. gasam:alpha=-1",
    ),
    arg("--seeds", nargs="+", type=int, help="default: the config's compare.seeds"),
    arg(
        "--jobs",
        type=int,
        help="parallel processes, also on one GPU with --device cuda (default: compare.jobs)",
    ),
    arg(
        "--tune",
        action="store_true",
        help="tune each method on the first seed's validation "
        "loss first (--param, --trials, ...), then run every seed at its best settings",
    ),
    "study",
)
def cmd_compare(args: argparse.Namespace) -> int:
    from flatlm.lm.compare import compare

    if args.tune or args.storage:  # the study queue (flatlm.lm.tune)
        return _study_command(args, compare=True)

    # Through the config, so a mistyped method is a ConfigError naming it before any run starts.
    extra = {
        "compare.methods": args.methods,
        "compare.seeds": args.seeds,
        "compare.jobs": args.jobs,
    }
    cfg = _load(args, extra)
    methods, seeds, jobs = cfg.compare.methods, cfg.compare.seeds, cfg.compare.jobs
    out = args.out or f"runs/compare-{_run_name(args, cfg)}"
    report = compare(cfg, out, methods, seeds, jobs=jobs, quiet=args.quiet, resume=args.resume)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 reports
        return 0
    print(report["table"], end="")
    if report["missing"] and not report.get("interrupted") and report.get("failed"):
        return _say_failed_runs(args, out, report["failed"])
    if report["missing"]:
        print(f"interrupted: {len(report['missing'])} runs unfinished; continue with:")
        print(f"  {_resume_command(args, out)}")
        return EXIT_STOPPED
    print("wrote " + ", ".join(str(f) for f in report["files"]))
    return 0


def _say_failed_runs(args: argparse.Namespace, out: str, failed: list[str]) -> int:
    """Runs whose worker process died (killed, crashed): not an interrupt of the sweep. One
    line: which runs, why, and the command that runs them again."""
    runs = "run" if len(failed) == 1 else "runs"
    print(
        f"flatlm compare: error: {len(failed)} {runs} failed ({'; '.join(failed)}); the others "
        f"are done; run the failed ones again with: {_resume_command(args, out)}",
        file=sys.stderr,
    )
    return EXIT_FAILED


@subcommand(
    "tune",
    "tune settings (default: ρ) of one or more methods on the validation loss, with Optuna",
    "config",
    arg("--methods", nargs="+", help="methods to tune (default: optim.method)"),
    arg("--seed", type=int, help="the seed every trial trains with (= --set train.seed=N)"),
    arg("--jobs", type=int, default=1, help="worker processes on this machine (default 1)"),
    "study",
)
def cmd_tune(args: argparse.Namespace) -> int:
    return _study_command(args, compare=False)


def study_job(args: argparse.Namespace, *, compare: bool) -> tuple[Any, int]:
    """The job of `flatlm tune` or `flatlm compare --tune/--storage`, every input checked (a
    ConfigError or StudyError naming it), and its number of local workers."""
    from flatlm.lm.tune import make_job

    if compare:
        cfg = _load(args, {"compare.seeds": args.seeds, "compare.jobs": args.jobs})
        # --methods are checked by make_job, each as one run's config with its own --param
        # space: a step policy's required options may come only from there.
        methods = args.methods or cfg.compare.methods
        seeds, jobs = cfg.compare.seeds, cfg.compare.jobs
        out = args.out or f"runs/compare-{_run_name(args, cfg)}"
    else:
        cfg = _load(args, {"train.seed": args.seed})
        methods, seeds, jobs = args.methods or [cfg.optim.method], None, args.jobs
        out = args.out or f"runs/tune-{_run_name(args, cfg)}"
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    job = make_job(
        cfg,
        out,
        methods,
        args.params,
        trials=args.trials,
        sampler=args.sampler,
        pruner=args.pruner,
        final_seeds=seeds,
        storage=args.storage,
        study=args.study,
        heartbeat_s=args.heartbeat,
        quiet=args.quiet,
        jobs=jobs,
        tune=not compare or args.tune,
    )
    return job, jobs


def _study_command(args: argparse.Namespace, *, compare: bool) -> int:
    """`flatlm tune`, and `flatlm compare --tune/--storage`: runs handed out by a study."""
    from flatlm.lm.tune import run

    job, jobs = study_job(args, compare=compare)
    report = run(job, jobs=jobs)
    print(report["table"], end="")
    if report["stopped"]:
        print("stopped; continue with the same command:")
        print(f"  {shlex.join(['flatlm', *args.argv])}")
        return EXIT_STOPPED
    if report["files"]:
        print("wrote " + ", ".join(report["files"]))
    if report["failed"]:
        print(
            f"flatlm {'compare' if compare else 'tune'}: error: not everything ran "
            f"({'; '.join(report['failed'])}); fix the cause, then the same command continues",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


@subcommand(
    "report",
    "rebuild results.md/results.json/plots from a comparison folder (or tune.md from a study), "
    "or show one run's figures",
    arg(
        "dir",
        nargs="?",
        help="the folder `flatlm compare` or `flatlm tune` wrote, or one run's folder (then "
        "nothing is written)",
    ),
    arg("--storage", help="write the report of study --study from this database alone"),
    arg("--study", help="with --storage: the study's name"),
    arg("--out", help="with --storage: the folder to write the report into"),
)
def cmd_report(args: argparse.Namespace) -> int:
    from flatlm.lm.report import write_report

    if args.storage:
        from flatlm.lm.tune import report_from_storage

        if not args.study:
            raise ValueError("--storage needs --study NAME (the study's name in the storage)")
        report = report_from_storage(args.storage, args.study, args.out or f"runs/{args.study}")
    elif args.dir is None:
        raise ValueError("name the folder to report on, or --storage URL --study NAME")
    elif (Path(args.dir) / "study.json").is_file():
        from flatlm.lm.tune import report_from_folder

        report = report_from_folder(args.dir)
    else:
        report = write_report(args.dir)
    print(report["table"], end="")
    if report["files"]:
        print("wrote " + ", ".join(str(f) for f in report["files"]))
    return 0


@subcommand(
    "sharpness",
    "sharpness figures (Hessian spectrum, SAM decomposition, ...) of a trained checkpoint",
    arg(
        "checkpoint",
        help="a run folder (holding checkpoint.pt or checkpoint.dcp) or a checkpoint file",
    ),
    arg(
        "--split",
        nargs="+",
        default=["val"],
        choices=["train", "val", "test"],
        help="which fixed windows (default: val; train = the run's training tokens)",
    ),
    arg(
        "--batches", type=int, default=2, help="fixed batches of train.batch_size windows per split"
    ),
    arg(
        "--what",
        nargs="+",
        help="figures: hessian ggn residual decomposition sam_sharpness "
        "corruption (default: all but residual)",
    ),
    arg("--top-k", type=int, default=1, help="top eigenvalues per curvature matrix"),
    arg("--trace-samples", type=int, default=0, help="Hutch++ products for traces (0 = none)"),
    arg("--lanczos-iters", type=int, help="exactly N Lanczos products (default: ARPACK to 1e-6)"),
    arg(
        "--params",
        help="parameter subset: fnmatch pattern on names, e.g. 'blocks.0.*', or re:REGEX",
    ),
    arg("--device", default="cpu", help="cpu (default) or cuda"),
    arg(
        "--data",
        help="where the run's corpus is now, if it moved (the same text: its "
        "fingerprint is checked)",
    ),
    arg("--out", help="JSON file (default: sharpness.json beside the checkpoint)"),
    arg("--progress", action="store_true", help="a progress bar of matrix-vector products"),
)
def cmd_sharpness(args: argparse.Namespace) -> int:
    import json

    from flatlm.lm._io import atomic_write_text
    from flatlm.lm.diagnostics import checkpoint_sharpness, format_sharpness

    _check_sharpness_args(args)
    path = Path(args.checkpoint)
    out = (
        Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "sharpness.json"
    )
    if args.out:  # before minutes of products: a folder that cannot be made is an error now
        out.parent.mkdir(parents=True, exist_ok=True)
    report = checkpoint_sharpness(
        args.checkpoint,
        splits=args.split,
        batches=args.batches,
        what=args.what,
        top_k=args.top_k,
        trace_samples=args.trace_samples,
        lanczos_iters=args.lanczos_iters,
        params=args.params,
        device=args.device,
        progress=args.progress,
        data=args.data,
    )
    atomic_write_text(out, json.dumps(report, indent=1))
    print(format_sharpness(report), end="")
    print(f"wrote {out}")
    return 0


def _check_sharpness_args(args: argparse.Namespace) -> None:
    """The counts and the device of ``flatlm sharpness``, named by flag, before any loading."""
    from flatlm.lm.config import ConfigError, check_device_present

    for flag, value, low in [
        ("--batches", args.batches, 1),
        ("--top-k", args.top_k, 1),
        ("--lanczos-iters", args.lanczos_iters, 1),
        ("--trace-samples", args.trace_samples, 0),
    ]:
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    try:
        check_device_present(args.device)
    except ConfigError as e:  # the same check as train's, worded for this flag
        raise ValueError(str(e).replace("config key 'train.device'", "--device")) from None


@subcommand(
    "launch",
    "run `flatlm train` or `flatlm compare` in N processes on this machine (torchrun "
    "--standalone), keeping flatlm's exit code and one-line errors",
    arg("--nproc-per-node", type=int, default=2, help="processes (ranks), default 2"),
    arg("cmd", nargs=argparse.REMAINDER, help="train or compare and its arguments"),
)
def cmd_launch(args: argparse.Namespace) -> int:
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if not args.cmd or args.cmd[0] not in ("train", "compare"):
        raise ValueError(
            "flatlm launch runs train or compare, e.g. flatlm launch --nproc-per-node 2 train "
            "--preset quick"
        )
    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    n = str(args.nproc_per_node)
    torchrun = ["--standalone", "--nproc-per-node", n, "-m", "flatlm.cli", *args.cmd]
    # torchrun's own log lines (its thread note, each failure as a traceback) are replaced by
    # flatlm's one line per cause.
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="flatlm-launch-") as errors:
        os.environ[LAUNCH_COMMAND_ENV] = shlex.join(["flatlm", "launch", "--nproc-per-node", n])
        os.environ[LAUNCH_ERRORS_ENV] = errors
        try:
            run(get_args_parser().parse_args(torchrun))
            return 0
        except ChildFailedError as e:
            return _launch_failure(e, Path(errors), args.cmd[0])
        except SignalException:  # Ctrl-C: the ranks checkpointed, rank 0 printed the hint
            return EXIT_STOPPED
        finally:
            os.environ.pop(LAUNCH_COMMAND_ENV, None)
            os.environ.pop(LAUNCH_ERRORS_ENV, None)


def _launch_failure(e: Any, errors: Path, command: str) -> int:
    """The exit code of a failed launch and, where no rank printed it, the one line saying why.
    The cause is the first rank to fail (torchrun then stops the others with SIGTERM): killed
    by a signal, 128 + its number (137 for SIGKILL), named here; else its exit code (2, 3,
    130, ...), rank 0's if rank 0 failed too (it printed its line), else the rank's line."""
    import signal

    failures = dict(e.failures)
    rank, first = e.get_first_failure()
    if first.exitcode < 0:
        signum = -first.exitcode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        print(
            f"flatlm {command}: error: rank {rank} (pid {first.pid}) was killed by {name}; "
            "the last checkpoint is kept: run the same command with --resume",
            file=sys.stderr,
        )
        return 128 + signum
    if (errors / "rank0.txt").is_file():  # rank 0 printed its line: its code
        code = failures[0].exitcode if 0 in failures else first.exitcode
        return code if code > 0 else first.exitcode
    line = errors / f"rank{rank}.txt"
    if line.is_file():
        print(line.read_text(encoding="utf-8").rstrip("\n"), file=sys.stderr)
    return first.exitcode


def _say_error(command: str, e: BaseException) -> None:
    """The one line of an error; under `flatlm launch` a rank > 0 leaves it for the launcher
    (every rank usually fails alike: one line, not one per rank)."""
    text = f"flatlm {command}: error: {e}"
    errors, rank = os.environ.get(LAUNCH_ERRORS_ENV), os.environ.get("RANK", "0")
    if errors:  # rank 0's file only says that it printed
        with contextlib.suppress(OSError):
            (Path(errors) / f"rank{rank}.txt").write_text(text + "\n", encoding="utf-8")
            if rank != "0":
                return
    print(text, file=sys.stderr, flush=True)


def _lost_a_rank(e: BaseException) -> bool:
    """An error of the process group itself: another rank died (killed, crashed) mid-run."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    text = str(e)
    return isinstance(e, DistError) or (
        isinstance(e, RuntimeError)
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and any(s in text for s in ("gloo", "Connection closed by peer", "NCCL", "Broken pipe"))
    )


@subcommand("methods", "list the optimizer methods with their options and defaults")
def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_text(), end="")
    return 0


def methods_text() -> str:
    """Each method of the registry: its class, default ρ, passes per step and its own options
    with their defaults (read off the class), then the options every method shares."""
    import inspect

    from flatlm.optim import METHODS, SharpnessAwareOptimizer
    from flatlm.optim.policies import SPEC_DEFAULTS
    from flatlm.optim.registry import ADAMW_OPTIONS, ENGINE_OPTIONS, SCHEDULE_OPTIONS, method_info

    def defaults(cls: type, names: object) -> str:
        params = inspect.signature(cls.__init__).parameters
        known = {n: p.default for n, p in params.items()}
        known |= {n: v for n, v in SPEC_DEFAULTS.items() if v is not None}
        return ", ".join(
            f"{n}={known[n]!r}" if n in known else n
            for n in names  # type: ignore[attr-defined]
        )

    rows = [("method", "class", "default rho", "passes", "its own options (default)")]
    for name in METHODS:
        info = method_info(name)
        rho = "-" if info.rho is None else f"{info.rho:g}"
        passes = "1" if not info.sharpness_aware or not info.clean_backward else "2"
        own = defaults(info.cls, info.options) or "-"
        rows.append((name, info.cls.__name__, rho, passes, own))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    ]
    lines += [
        "",
        "every method but adamw also takes (the engine's): rho (the radius; default above), "
        + defaults(SharpnessAwareOptimizer, [n for n in ENGINE_OPTIONS if n != "rho"])
        + ", "
        + ", ".join(SCHEDULE_OPTIONS)
        + " (every: k, needed by reuse_direction, interval and looksam; total_steps: the run's "
        "steps, which the workbench fills in; rho_schedule: window:START:END, linear:..., "
        "cosine:..., lr — docs/workbench.md)",
        "and AdamW's: " + defaults(__import__("torch").optim.AdamW, ADAMW_OPTIONS),
        "Options go in the name (--method 'gasam:alpha=-1,ascent_steps=2'), in "
        "[optim.method_kwargs.NAME] of a config, or as keywords of flatlm.optim.create(NAME, ...).",
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from flatlm import __version__

    parser = argparse.ArgumentParser(
        prog="flatlm", description="Sharpness-aware training of language models."
    )
    parser.add_argument("--version", action="version", version=f"flatlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, specs, fn) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for flags, kwargs in specs:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code: 0 done, 2 an error in a config, data, checkpoint or
    folder (one line on stderr naming it), 3 a run that diverged, 130 stopped by Ctrl-C, 1 a run
    of a comparison failed (its worker process was killed or crashed) or, under torchrun,
    another rank died (one line naming it); under `flatlm launch`, 128 + N for a rank killed
    by signal N."""
    from flatlm._extras import MissingExtraError

    try:
        from flatlm.lm._io import FolderError
        from flatlm.lm.checkpoint import CheckpointError
        from flatlm.lm.config import ConfigError
    except MissingExtraError as e:
        print(f"flatlm: error: {e}", file=sys.stderr)
        return EXIT_ERROR

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the resume hint
    try:
        return args.handler(args)
    except (ConfigError, CheckpointError, FolderError, ValueError, OSError, MissingExtraError) as e:
        _say_error(args.command, e)
        return EXIT_ERROR
    except Exception as e:
        if not _lost_a_rank(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say_error(
            args.command,
            f"another process of this run stopped (killed or failed), so this one cannot go "
            f"on ({type(e).__name__}: {first[:160]}); the last checkpoint is kept: run the same "
            "command with --resume",
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
