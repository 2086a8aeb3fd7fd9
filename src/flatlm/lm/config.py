"""Run configuration: nested dataclasses filled from TOML/YAML, presets and ``--set`` overrides.

Why strict: a typo such as ``train.lr_sceduler`` must fail loudly instead of silently running the
default, because a comparison run with a wrong setting wastes an hour and looks plausible.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the offending key."""


@dataclass
class ModelConfig:
    """Model shape. ``size`` picks named dims; a non-zero ``n_layer``/``n_head``/``n_embd`` overrides."""

    arch: str = "gpt"  # "gpt" or "lstm"
    size: str = "tiny"
    n_layer: int = 0  # 0: take from ``size``
    n_head: int = 0  # GPT only
    n_embd: int = 0  # GPT width; LSTM embedding = hidden size (tied)
    block_size: int = 128  # context length in tokens
    dropout: float = 0.0


# The named sizes (flatlm.lm.models builds them; its docstring gives the parameter counts).
GPT_SIZES: dict[str, tuple[int, int, int]] = {  # name: (n_layer, n_head, n_embd)
    "micro": (2, 2, 64),
    "tiny": (2, 4, 128),
    "small": (4, 4, 256),
    "medium": (6, 6, 384),
    "large": (8, 8, 512),
    "xl": (12, 12, 576),
}
LSTM_SIZES: dict[str, tuple[int, int]] = {  # name: (n_layer, hidden)
    "micro": (1, 128),
    "tiny": (2, 256),
    "small": (2, 512),
    "medium": (2, 650),
    "large": (2, 1024),
}


def resolve_dims(cfg: ModelConfig) -> dict[str, int]:
    """Named size plus explicit overrides -> concrete dims (also stored in checkpoints)."""
    table = GPT_SIZES if cfg.arch == "gpt" else LSTM_SIZES
    if cfg.size not in table and not (cfg.n_layer and cfg.n_embd):
        names = ", ".join(table)
        raise ValueError(f"unknown {cfg.arch} size '{cfg.size}' (choose from {names})")
    if cfg.arch == "gpt":
        n_layer, n_head, n_embd = GPT_SIZES.get(cfg.size, (0, 0, 0))
        dims = {
            "n_layer": cfg.n_layer or n_layer,
            "n_head": cfg.n_head or n_head or 1,
            "n_embd": cfg.n_embd or n_embd,
        }
        if dims["n_embd"] % dims["n_head"]:
            raise ValueError(f"model.n_embd={dims['n_embd']} not divisible by n_head")
        return dims
    n_layer, hidden = LSTM_SIZES.get(cfg.size, (0, 0))
    return {"n_layer": cfg.n_layer or n_layer, "n_embd": cfg.n_embd or hidden}


@dataclass
class DataConfig:
    """Which text and how it is tokenised. ``corpus`` is "sotu" (bundled) or a file/folder path."""

    corpus: str = "sotu"
    encoding: str = "utf-8"  # of a user corpus; bytes that are not valid text in it are refused
    # A folder corpus's files: those matching any ``include`` glob (all if none), less those
    # matching any ``exclude`` one; a glob matches a file's name or its path in the folder.
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    tokenizer: str = "bpe"  # "char" or "bpe" (byte-level BPE trained on the training split)
    vocab_size: int = 4096  # BPE only
    val_fraction: float = 0.1  # user corpora only (split by document order)
    test_fraction: float = 0.1
    # Train on only the last N tokens of the training split (0 = all of it): a small split seen
    # for many epochs is the over-fitting regime. The tokeniser still sees the whole split.
    train_tokens: int = 0


@dataclass
class OptimConfig:
    """Optimizer: a name from ``flatlm.optim.METHODS`` and its hyper-parameters."""

    method: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    rho: float | None = None  # None: each method's own default radius
    # ρ over the run (flatlm.optim.schedules): "constant", "window:0:0.1" (SAM in the first 10 %
    # of steps, plain steps after), "linear:0:0.2", "cosine:0.5:1:1:0", bounds in steps "60s".
    # A method spec's own rho_schedule option wins; AdamW ignores it.
    rho_schedule: str = "constant"
    # Extra keyword arguments per method, e.g. ``[optim.method_kwargs.gasam] alpha = 1.0``.
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Loop, schedule, evaluation and checkpointing."""

    steps: int = 200
    batch_size: int = 16
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8  # fixed validation windows: eval_batches * batch_size sequences
    test_batches: int = 16  # fixed test windows for the final test evaluation
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end and on Ctrl-C (and checkpoint_minutes)
    # Also a checkpoint once this many minutes have passed since the last one (0 = off): a
    # default run killed (kill -9, a crash, a lost machine) loses at most this much.
    checkpoint_minutes: float = 5.0
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    # Sharpness logging (flatlm.lm.diagnostics): every N steps (0 = off) a few Lanczos products
    # on fixed training batches give lambda_max(H) and SAM's logit/functional ratio.
    sharpness_every: int = 0
    sharpness_batches: int = 1  # fixed training batches (of batch_size windows) it uses
    sharpness_iters: int = 10  # Lanczos products per estimate (a lower bound on lambda_max)
    sharpness_final: bool = False  # once at the end of the run, into result.json
    # Where the metric records go (flatlm.lm.trackers): "jsonl" (required: flatlm report and
    # compare read metrics.jsonl), "csv", "tensorboard" and "wandb" (each its own extra).
    log: list[str] = field(default_factory=lambda: ["jsonl", "csv"])
    wandb_project: str = "flatlm"
    wandb_mode: str = (
        "offline"  # "offline" (no account; `wandb sync` uploads), "online", "disabled"
    )
    # torch.compile the model in place (flatlm.optim.compile.compile_model; docs/compile.md).
    compile: bool = False
    # How the model is spread over several processes (torchrun): "ddp" replicates it
    # (DistributedDataParallel, rank 0 writes checkpoint.pt); "fsdp" shards it with FSDP2
    # (fully_shard per block, sharded checkpoints through torch.distributed.checkpoint, a mesh of
    # one rank without torchrun). STRATEGIES lists them.
    strategy: str = "ddp"


STRATEGIES = ("ddp", "fsdp")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


@dataclass
class CompareConfig:
    """Defaults for ``flatlm compare`` (CLI flags override)."""

    methods: list[str] = field(
        default_factory=lambda: ["adamw", "sam", "fsam", "psam", "pfsam", "gasam"]
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    jobs: int = 1


@dataclass
class RunConfig:
    """The whole config; one section per dataclass above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; the error names ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table/dict, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(
            f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _unknown(key: str, known: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(f"unknown config key '{key}'{extra}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Write a nested dict into the dataclass tree ``obj`` in place, strictly."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, names)
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a section/table, got {v!r}")
            _apply(current, v, prefix=f"{key}.")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that ``3e-3`` and ``1e5`` are floats (YAML 1.2 and
    TOML read them so; YAML 1.1's float needs a dot, which turned ``lr: 3e-3`` into a string)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml/.yaml/.yml file into a nested dict (no schema check yet)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte offset {e.start}); save it as UTF-8"
        ) from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_YAMLLoader) or {}
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"malformed config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a table of sections")
    return data


def preset_path(name: str) -> Path:
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        avail = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"unknown preset '{name}' (available: {avail})")
    return path


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value``: the value is read as a TOML value (numbers, bools, lists), else a string."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- preset <- config file <- overrides (``key=value`` strings or a flat dict)."""
    cfg = RunConfig()
    if preset:
        _apply(cfg, read_config_file(preset_path(preset)))
    if path:
        _apply(cfg, read_config_file(path))
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        _apply(cfg, _nest(key, value))
    if cfg.data.corpus != "sotu":  # recorded absolute: a run's folder works from anywhere
        cfg.data.corpus = os.path.abspath(os.path.expanduser(cfg.data.corpus))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg


def method_options(cfg: OptimConfig) -> tuple[str, dict[str, Any]]:
    """The method's base name and the options it is built with, by precedence: options in the
    name, then ``[optim.method_kwargs."<full name>"]``, then ``[optim.method_kwargs.<base>]``,
    then ``optim.rho``."""
    from flatlm.optim import parse_method

    # [optim.method_kwargs.gasam] applies to "gasam" and to variants like "gasam:alpha=-1";
    # a table under the full name applies to that name only.
    base, in_name = parse_method(cfg.method)
    kwargs = {**cfg.method_kwargs.get(base, {}), **cfg.method_kwargs.get(cfg.method, {})}
    if base != "adamw" and cfg.rho is not None:
        kwargs.setdefault("rho", cfg.rho)
    if base != "adamw":
        kwargs.setdefault("rho_schedule", cfg.rho_schedule)
    return base, kwargs | in_name


def rho_schedule(cfg: OptimConfig) -> str:
    """The ρ schedule a run follows (``constant`` for AdamW): a spec's ``rho_schedule`` option,
    else its ``[optim.method_kwargs]`` table's, else ``optim.rho_schedule``."""
    return method_options(cfg)[1].get("rho_schedule", "constant")


def optimizer_kwargs(
    cfg: OptimConfig, grad_clip: float, total_steps: int | None = None
) -> dict[str, Any]:
    """Everything ``flatlm.optim.create(cfg.method, params, **kwargs)`` gets in a run: the
    method's options, the AdamW settings, and clipping (inside the step for SAM-types).
    ``total_steps`` (the run's ``train.steps``) is the ``total_steps`` of a step policy that
    moves over training (AE-SAM's threshold, RST with ``rst_p_end``) unless the spec sets it."""
    base, kwargs = method_options(cfg)
    kwargs.pop("rho_schedule", None)  # the run's scheduler, not the optimizer's (rho_schedule())
    policy = kwargs.get("policy")
    moves = policy == "aesam" or (policy == "rst" and kwargs.get("rst_p_end") is not None)
    if moves and total_steps is not None and "total_steps" not in kwargs:
        kwargs["total_steps"] = total_steps
    if base != "adamw":
        kwargs["max_grad_norm"] = grad_clip if grad_clip > 0 else None
    betas = (cfg.beta1, cfg.beta2)
    return kwargs | {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": betas}


# Optimizer options the workbench sets from its own keys: a method option may not set them too.
WORKBENCH_OPTIONS = {
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "betas": "optim.beta1 and optim.beta2",
    "max_grad_norm": "train.grad_clip",
}


def _check_options(key: str, method: str, options: dict[str, Any]) -> None:
    """Names and value types (``flatlm.optim.check_options``), and none the workbench sets."""
    from flatlm.optim.registry import check_options

    for name in options:
        if name in WORKBENCH_OPTIONS:
            raise ConfigError(
                f"config key '{key}': option {name!r} is set by {WORKBENCH_OPTIONS[name]} "
                "in the workbench; set that instead"
            )
    try:
        check_options(method, options)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from e


def _check_method(key: str, spec: str, cfg: RunConfig, table: dict[str, Any] | None = None) -> None:
    """A method spec (and its ``[optim.method_kwargs]`` table) the optimizer can be built from
    with this config, else a ConfigError: option names and types first, then the values, by
    building it on a one-element parameter, so ``compare`` stops at load time, not after the
    first methods have run."""
    import torch

    from flatlm.optim import create, parse_method

    try:
        base, in_name = parse_method(spec)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from e
    _check_options(key, base, in_name)
    if table is not None:
        if ":" not in spec and spec != base:  # method_options looks tables up by these names
            raise ConfigError(f"config key '{key}': name the table [optim.method_kwargs.{base}]")
        _check_options(key, base, table)
    optim = dataclasses.replace(cfg.optim, method=spec)
    try:
        kwargs = optimizer_kwargs(optim, 0.0, cfg.train.steps)
        create(base, [torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key '{key}' ({spec!r}): {e}") from e


def _spec_for_table(key: str, cfg: RunConfig) -> str:
    """The spec a ``[optim.method_kwargs.<base>]`` table is checked with: the run's own method
    (or a compared one) of that base when there is one, since a table may complete a spec whose
    base alone cannot be built (bSAM needs ``num_data``); else the key itself."""
    from flatlm.optim import parse_method

    if ":" in key:
        return key
    for spec in (cfg.optim.method, *cfg.compare.methods):
        try:
            if ":" in spec and parse_method(spec)[0] == key:
                return spec
        except ValueError:  # checked on its own below
            continue
    return key


def _check_rho_schedule(spec: str) -> None:
    from flatlm.optim.schedules import parse_rho_schedule

    try:
        parse_rho_schedule(spec)
    except ValueError as e:
        raise ConfigError(f"config key 'optim.rho_schedule': {e}") from e


def _check_device(name: str) -> Any:
    """'cpu', 'cuda' or 'cuda:N' (a config may name a GPU it will run on elsewhere)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"config key 'train.device' must be 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def check_device_present(name: str) -> None:
    """Before training: the config's device exists on this machine."""
    import torch

    device = _check_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"config key 'train.device' is {name!r} but torch sees no CUDA device here "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"config key 'train.device' is {name!r} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )


def check_threads_present(n: int) -> None:
    """Before training: no more torch threads than this machine has CPUs (more only slow a run,
    and very many crash the process: OpenMP cannot start them)."""
    import os

    cpus = os.cpu_count() or 1
    if n > cpus:
        raise ConfigError(
            f"config key 'train.threads' is {n} but this machine has {cpus} CPUs; use at most "
            f"{cpus} (0 = flatlm chooses)"
        )


def _check_model(cfg: ModelConfig) -> None:
    """A size this architecture has, and dims that fit (what ``build_model`` will need)."""
    try:
        resolve_dims(cfg)
    except ValueError as e:
        raise ConfigError(f"config key 'model.size': {e}") from e


def _check_encoding(name: str) -> None:
    try:
        codecs.lookup(name)
    except LookupError:
        raise ConfigError(f"config key 'data.encoding': unknown text encoding {name!r}") from None


def _check_trackers(tc: TrainConfig) -> None:
    """Known tracker names, "jsonl" among them, no repeats, and each one's package installed
    (a missing one names the extra that installs it)."""
    from flatlm.lm.trackers import TRACKERS, WANDB_MODES, missing_package

    known = ", ".join(repr(n) for n in TRACKERS)
    for i, name in enumerate(tc.log):
        if name not in TRACKERS:
            raise ConfigError(
                f"config key 'train.log[{i}]': unknown tracker {name!r} (known: {known})"
            )
    if "jsonl" not in tc.log:
        raise ConfigError(
            "config key 'train.log' must include 'jsonl': metrics.jsonl is the run's record, "
            f"which flatlm report and compare read (got {tc.log!r})"
        )
    if len(set(tc.log)) != len(tc.log):
        raise ConfigError(f"config key 'train.log' must not repeat a tracker (got {tc.log!r})")
    for name in tc.log:
        error = missing_package(name)
        if error is not None:
            raise ConfigError(f"config key 'train.log' names {name!r}, but {error}")
    if tc.wandb_mode not in WANDB_MODES:
        modes = ", ".join(repr(m) for m in WANDB_MODES)
        raise ConfigError(
            f"config key 'train.wandb_mode' must be one of {modes}, got {tc.wandb_mode!r}"
        )


def _check_strategy(tc: TrainConfig) -> None:
    """A known ``train.strategy``, and none of the settings FSDP2 is not run with here."""
    if tc.strategy not in STRATEGIES:
        allowed = ", ".join(repr(s) for s in STRATEGIES)
        raise ConfigError(
            f"config key 'train.strategy' must be one of {allowed}, got {tc.strategy!r}"
        )
    if tc.strategy == "fsdp" and tc.compile:
        raise ConfigError(
            "config key 'train.compile' is true but train.strategy is 'fsdp': torch.compile of an "
            "FSDP2-sharded model is not supported by the workbench (not tested); set "
            "train.compile=false or train.strategy=ddp"
        )


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    _check_strategy(cfg.train)
    for key, table in cfg.optim.method_kwargs.items():  # keyed by method name, options allowed
        _check_method(f"optim.method_kwargs.{key}", _spec_for_table(key, cfg), cfg, table)
    _check_method("optim.method", cfg.optim.method, cfg)
    for i, method in enumerate(cfg.compare.methods):
        _check_method(f"compare.methods[{i}]", method, cfg)
    _check_rho_schedule(cfg.optim.rho_schedule)
    _check_device(cfg.train.device)
    _check_encoding(cfg.data.encoding)
    _check_model(cfg.model)
    _check_trackers(cfg.train)
    m, d, o, tc, cc = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.compare
    checks = [
        (m.arch in ("gpt", "lstm"), "model.arch", "must be 'gpt' or 'lstm'"),
        (min(m.n_layer, m.n_head, m.n_embd) >= 0, "model.n_layer", "n_head, n_embd must be >= 0"),
        (m.block_size > 0, "model.block_size", "must be > 0"),
        (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (d.tokenizer in ("char", "bpe"), "data.tokenizer", "must be 'char' or 'bpe'"),
        (d.vocab_size >= 260, "data.vocab_size", "must be >= 260 (256 bytes + specials)"),
        (
            d.train_tokens == 0 or d.train_tokens > m.block_size,
            "data.train_tokens",
            "must be 0 (all) or more than model.block_size",
        ),
        (
            d.val_fraction > 0 and d.test_fraction > 0 and d.val_fraction + d.test_fraction < 1,
            "data.val_fraction",
            "val_fraction and test_fraction must be > 0 and sum to < 1",
        ),
        (o.lr > 0, "optim.lr", "must be > 0"),
        (o.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "beta1 and beta2 must be in [0, 1)"),
        (o.rho is None or o.rho >= 0, "optim.rho", "must be >= 0 (or none: each method's own)"),
        (tc.steps > 0, "train.steps", "must be > 0"),
        (tc.batch_size > 0, "train.batch_size", "must be > 0"),
        (tc.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (
            0 <= tc.min_lr_ratio <= 1,
            "train.min_lr_ratio",
            "must be in [0, 1] (the LR decays to lr * min_lr_ratio)",
        ),
        (tc.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)"),
        (tc.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = only at the end)"),
        (tc.eval_batches > 0, "train.eval_batches", "must be > 0"),
        (tc.test_batches > 0, "train.test_batches", "must be > 0"),
        (tc.log_every > 0, "train.log_every", "must be > 0"),
        (tc.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)"),
        (tc.checkpoint_minutes >= 0, "train.checkpoint_minutes", "must be >= 0 (0 = off)"),
        (tc.threads >= 0, "train.threads", "must be >= 0 (0 = torch's default)"),
        (tc.sharpness_every >= 0, "train.sharpness_every", "must be >= 0 (0 = off)"),
        (tc.sharpness_batches > 0, "train.sharpness_batches", "must be > 0"),
        (tc.sharpness_iters > 0, "train.sharpness_iters", "must be > 0"),
        (0 <= tc.seed <= MAX_SEED, "train.seed", f"must be in [0, {MAX_SEED}] (2**63 - 1)"),
        (
            all(0 <= seed <= MAX_SEED for seed in cc.seeds),
            "compare.seeds",
            f"must each be in [0, {MAX_SEED}] (2**63 - 1)",
        ),
        (cc.jobs > 0, "compare.jobs", "must be > 0"),
        (len(set(cc.methods)) == len(cc.methods), "compare.methods", "must not repeat a method"),
        (len(set(cc.seeds)) == len(cc.seeds), "compare.seeds", "must not repeat a seed"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")


# ----------------------------------------------------------------------------- resume

# Settings a resumed run may change: they do not change what it computes (threads, how often it
# logs and checkpoints, where the records go), or changing them is the point (more steps: the
# cosine stretches from the checkpoint on). A run records every such change
# (``setting_changes`` in result.json). ``train.compile`` is not one: under Inductor, dropout
# draws other masks than eager PyTorch (docs/compile.md).
RESUME_ALLOWED = (
    "train.steps",
    "train.threads",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.log",
    "train.wandb_project",
    "train.wandb_mode",
)


def run_settings(cfg: RunConfig) -> dict[str, Any]:
    """``"section.key" -> value`` for every setting of a run (``compare.*`` is not one)."""
    return {
        f"{section}.{key}": value
        for section, values in cfg.to_dict().items()
        if section != "compare"
        for key, value in values.items()
    }


def setting_changes(before: RunConfig, now: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(key, value before, value now)`` for every run setting that differs."""
    a, b = run_settings(before), run_settings(now)
    return [(key, a.get(key), value) for key, value in b.items() if a.get(key) != value]
