"""Run configuration: nested dataclasses filled from TOML/YAML, presets and ``--set`` overrides.

Why strict: a typo such as ``train.lr_sceduler`` must fail loudly instead of silently running the
default, because a comparison run with a wrong setting wastes an hour and looks plausible.
"""

from __future__ import annotations

import dataclasses
import difflib
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


@dataclass
class DataConfig:
    """Which text and how it is tokenised. ``corpus`` is "sotu" (bundled) or a file/folder path."""

    corpus: str = "sotu"
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
    checkpoint_every: int = 0  # 0: only at the end and on Ctrl-C
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    # Sharpness logging (flatlm.lm.diagnostics): every N steps (0 = off) a few Lanczos products
    # on fixed training batches give lambda_max(H) and SAM's logit/functional ratio.
    sharpness_every: int = 0
    sharpness_batches: int = 1  # fixed training batches (of batch_size windows) it uses
    sharpness_iters: int = 10  # Lanczos products per estimate (a lower bound on lambda_max)
    sharpness_final: bool = False  # once at the end of the run, into result.json


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml/.yaml/.yml file into a nested dict (no schema check yet)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
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
    return base, kwargs | in_name


def _check_method(key: str, spec: str) -> None:
    """A method name (with options) that ``flatlm.optim.parse_method`` accepts, else a ConfigError."""
    from flatlm.optim import parse_method

    try:
        parse_method(spec)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from e


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    _check_method("optim.method", cfg.optim.method)
    for i, method in enumerate(cfg.compare.methods):
        _check_method(f"compare.methods[{i}]", method)
    tc = cfg.train
    checks = [
        (cfg.model.arch in ("gpt", "lstm"), "model.arch", "must be 'gpt' or 'lstm'"),
        (cfg.data.tokenizer in ("char", "bpe"), "data.tokenizer", "must be 'char' or 'bpe'"),
        (cfg.data.vocab_size >= 260, "data.vocab_size", "must be >= 260 (256 bytes + specials)"),
        (cfg.model.block_size > 0, "model.block_size", "must be > 0"),
        (0.0 <= cfg.model.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (cfg.train.steps >= 0, "train.steps", "must be >= 0"),
        (cfg.train.batch_size > 0, "train.batch_size", "must be > 0"),
        (cfg.train.eval_batches > 0, "train.eval_batches", "must be > 0"),
        (cfg.train.test_batches > 0, "train.test_batches", "must be > 0"),
        (cfg.train.eval_every >= 0, "train.eval_every", "must be >= 0"),
        (tc.sharpness_every >= 0, "train.sharpness_every", "must be >= 0 (0 = off)"),
        (tc.sharpness_batches > 0, "train.sharpness_batches", "must be > 0"),
        (tc.sharpness_iters > 0, "train.sharpness_iters", "must be > 0"),
        (
            cfg.data.train_tokens == 0 or cfg.data.train_tokens > cfg.model.block_size,
            "data.train_tokens",
            "must be 0 (all) or more than model.block_size",
        ),
        (
            cfg.data.val_fraction > 0
            and cfg.data.test_fraction > 0
            and cfg.data.val_fraction + cfg.data.test_fraction < 1,
            "data.val_fraction",
            "val_fraction and test_fraction must be > 0 and sum to < 1",
        ),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")
