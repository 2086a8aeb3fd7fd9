"""Methods by short name: the one place that parses method specs, knows their options, and
builds optimizers.

A spec is a short name with optional options, ``"gasam:alpha=1,ascent_steps=2"``. The CLI,
configs, the workbench, the Hugging Face integration and the benchmarks all go through
:func:`parse_method` / :func:`check_options` / :func:`create`, so a misspelt option or a value
of the wrong type is refused the same way everywhere, before anything runs.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flatlm.optim.bsam import BSAMBase
from flatlm.optim.methods import (
    ASAM,
    BSAM,
    GASAM,
    GCSAM,
    GSAM,
    MSAM,
    SAM,
    WSAM,
    FriendlySAM,
    FunctionalSAM,
    MomentumFunctionalSAM,
    MomentumPreconditionedFunctionalSAM,
    PreconditionedFunctionalSAM,
    PreconditionedSAM,
)
from flatlm.optim.policies import SPEC_OPTIONS, make_policy
from flatlm.optim.validation import check_param_lists

__all__ = [
    "METHODS",
    "MethodInfo",
    "check_options",
    "create",
    "decay_groups",
    "default_rho",
    "method_info",
    "parse_method",
]

#: Options every sharpness-aware method takes (the engine's), with their types.
ENGINE_OPTIONS: dict[str, type] = {
    "rho": float,
    "max_grad_norm": float,
    "perturb_every": int,
    **SPEC_OPTIONS,
    "ascent_steps": int,
    "replay_rng": bool,
    "skip_nonfinite": bool,
    "distributed": str,
}
#: Options of a spec that belong to the run, not the optimizer: ``rho_schedule`` names a ρ
#: schedule (flatlm.optim.schedules), which needs the run's length, so ``create`` refuses it and
#: the workbench builds the scheduler.
SCHEDULE_OPTIONS: dict[str, type] = {"rho_schedule": str}
#: torch.optim.AdamW's options that a spec may set (``betas`` only from Python: a tuple).
ADAMW_OPTIONS: dict[str, type] = {
    "lr": float,
    "betas": tuple,
    "eps": float,
    "weight_decay": float,
    "amsgrad": bool,
    "maximize": bool,
    "foreach": bool,
    "fused": bool,
    "capturable": bool,
    "differentiable": bool,
}


@dataclass(frozen=True)
class MethodInfo:
    """A method's class, its own options (beyond the engine's and AdamW's) and its default ρ."""

    name: str
    cls: type[torch.optim.Optimizer]
    options: dict[str, type] = field(default_factory=dict)
    rho: float | None = 0.05
    #: False for the one-pass methods, which perturb along the momentum without a clean backward.
    clean_backward: bool = True
    #: The base optimizer ``create`` builds when none is given (AdamW; bsam's own BSAMBase).
    base: type[torch.optim.Optimizer] = torch.optim.AdamW

    @property
    def sharpness_aware(self) -> bool:
        return self.rho is not None

    def all_options(self) -> dict[str, type]:
        engine = {**ENGINE_OPTIONS, **SCHEDULE_OPTIONS} if self.sharpness_aware else {}
        return {**ADAMW_OPTIONS, **engine, **self.options}


_GASAM_OPTIONS = {
    "alpha": float,
    "beta": float,
    "normalize": bool,
    "xi": float,
    "max_scale": float,
    "radius": str,
}

_INFO: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("adamw", torch.optim.AdamW, rho=None),
        MethodInfo("sam", SAM, {"adaptive": bool, "eta": float}),
        MethodInfo("fsam", FunctionalSAM),
        MethodInfo("asam", ASAM, {"eta": float}, rho=ASAM.DEFAULT_RHO),
        MethodInfo("psam", PreconditionedSAM, {"moment": str}),
        MethodInfo("pfsam", PreconditionedFunctionalSAM, {"moment": str}),
        MethodInfo("gasam", GASAM, _GASAM_OPTIONS),
        MethodInfo("msam", MSAM, {"preconditioned": bool}, clean_backward=False),
        MethodInfo("mfsam", MomentumFunctionalSAM, clean_backward=False),
        MethodInfo("mpfsam", MomentumPreconditionedFunctionalSAM, clean_backward=False),
        MethodInfo("wsam", WSAM, {"gamma": float}),
        MethodInfo("gsam", GSAM, {"alpha": float}),
        MethodInfo("friendlysam", FriendlySAM, {"sigma": float, "lmbda": float}),
        MethodInfo("gcsam", GCSAM),
        MethodInfo(
            "bsam",
            BSAM,
            {"num_data": int, "damping": float, "s0": float, "seed": int},
            rho=BSAM.DEFAULT_RHO,
            base=BSAMBase,
        ),
    )
}

#: Short names used by the CLI, configs and the Hugging Face integration.
METHODS: dict[str, type[torch.optim.Optimizer]] = {name: i.cls for name, i in _INFO.items()}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def method_info(name: str) -> MethodInfo:
    """The registry's entry for a short name (options in a spec are ignored)."""
    key = _key(name.partition(":")[0])
    if key not in _INFO:
        close = difflib.get_close_matches(key, list(_INFO), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name.strip()!r}{hint}; choose one of {', '.join(_INFO)}")
    return _INFO[key]


def default_rho(spec: str) -> float | None:
    """The radius a spec runs with when nothing sets ρ (None for plain AdamW)."""
    key, options = parse_method(spec)
    return options.get("rho", _INFO[key].rho)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"gasam:alpha=-1,ascent_steps=2"`` -> ``("gasam", {"alpha": -1.0, "ascent_steps": 2})``.

    A method name with optional keyword overrides, so a comparison can name variants of one
    method. Each option must be one the method takes, with a value of its type (``true``/
    ``false`` for switches, whole numbers for counts); anything else is a ValueError naming it.
    """
    name, colon, rest = spec.partition(":")
    info = method_info(name)
    options: dict[str, Any] = {}
    if colon and not rest.strip():  # "sam:" is a typo for something, not "sam"
        raise ValueError(f"{spec!r} has a ':' but no options: write {name!r} or {name}:key=value")
    for item in (part.strip() for part in rest.split(",") if colon):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"bad method option {item!r} in {spec!r}: expected key=value")
        if k.strip() in options:  # the later would win silently
            raise ValueError(f"option {k.strip()!r} is given twice in {spec!r}: give it once")
        options[k.strip()] = _parse_value(v.strip())
    check_options(info.name, options, where=f"in {spec!r}")
    return info.name, options


def check_options(name: str, options: dict[str, Any], where: str = "") -> None:
    """Refuse an option the method does not take, or a value of the wrong type."""
    info = method_info(name)
    known = info.all_options()
    suffix = f" {where}" if where else ""
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{info.name} has no option {key!r}{suffix}: {hint}its options are "
                f"{', '.join(sorted(known))}"
            )
        if value is not None:
            _check_type(info.name, key, value, known[key], suffix)
        if key == "rho_schedule" and value is not None:
            from flatlm.optim.schedules import parse_rho_schedule

            try:
                parse_rho_schedule(value)
            except ValueError as e:
                raise ValueError(f"{info.name} option 'rho_schedule'{suffix}: {e}") from None


def _check_type(method: str, key: str, value: Any, expected: type, suffix: str) -> None:
    if expected is bool:
        ok = isinstance(value, bool)
        want = "true or false"
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "a whole number"
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) if ok else False
        want = "a finite number"
    elif expected is tuple:
        ok = isinstance(value, (tuple, list))
        want = "a tuple"
    else:
        ok = isinstance(value, expected)
        want = f"a {expected.__name__}"
    if not ok:
        raise ValueError(f"{method} option {key!r}{suffix} must be {want}, got {value!r}")


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with the usual no-decay rule (nanoGPT's and the HF Trainer's, with
    embeddings added): tensors of two or more dimensions decay; biases, normalisation gains and
    the weights of ``nn.Embedding`` modules (and a head tied to one) get weight decay 0."""
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create(
    name: str,
    params: Any,
    *,
    base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build a method by its short name (see ``METHODS``, ``parse_method``) over ``base_optimizer``.

    ``params``: parameters or groups, as for any optimizer; or a model (``nn.Module``), grouped
    by :func:`decay_groups` with ``weight_decay`` (AdamW's default 0.01 if not given); or None
    with an already-built ``base_optimizer`` to wrap (its groups and state are used as they are).
    ``"adamw"`` gives a plain AdamW; the sharpness-aware options (``rho``, ``max_grad_norm``) are
    then ignored if None and an error otherwise. A None value means "the method's default".
    Options in the name (``"gasam:alpha=-1"``) take precedence over keyword arguments.
    The step-policy options (``policy``, ``every``, ``looksam_alpha``, ``aesam_*``, ``rst_*``,
    ``policy_seed``, ``total_steps``; :data:`flatlm.optim.policies.SPEC_OPTIONS`) build the
    engine's ``policy`` (``"sam:policy=looksam,every=5"``).
    """
    key, overrides = parse_method(name)
    info = _INFO[key]
    if base_optimizer is None:  # AdamW, or the method's own (bsam's BSAMBase)
        base_optimizer = info.base
    kwargs = {k: v for k, v in {**kwargs, **overrides}.items() if v is not None}
    if kwargs.pop("rho_schedule", "constant") != "constant":
        raise ValueError(
            "rho_schedule is applied over a run by a scheduler, not by the optimizer: build "
            "the optimizer without it, then flatlm.optim.schedules.build_rho_schedule(opt, "
            "schedule, total_steps) and step it after each optimizer step"
        )
    _check_create_keywords(info, base_optimizer, kwargs)
    if isinstance(params, torch.nn.Module):
        params = decay_groups(params, kwargs.get("weight_decay", 0.01))
    if not info.sharpness_aware:
        params = list(params)
        check_param_lists(params)
        return torch.optim.AdamW(params, **kwargs)
    policy_options = {k: kwargs.pop(k) for k in list(kwargs) if k in SPEC_OPTIONS}
    if policy_options:  # the spec's policy options make one StepPolicy (perturb_every too)
        name = policy_options.pop("policy", None)
        kwargs["policy"] = make_policy(name, kwargs.pop("perturb_every", 1), **policy_options)
    return info.cls(params, base_optimizer, **kwargs)


def _check_create_keywords(info: MethodInfo, base: Any, kwargs: dict[str, Any]) -> None:
    """Every keyword of ``create`` is the method's, the engine's or the base optimizer's: one
    that is none of them is named with all three lists (not AdamW's bare TypeError), and a
    base optimizer passed under another name points to ``base_optimizer=``."""
    if not info.sharpness_aware:
        engine_options = sorted(set(kwargs) & set(ENGINE_OPTIONS))
        if engine_options:
            raise ValueError(f"plain AdamW takes no sharpness-aware options, got {engine_options}")
        base, own = torch.optim.AdamW, {}
    else:
        own = {**ENGINE_OPTIONS, **info.options}
        own |= dict.fromkeys(set(_init_keywords(info.cls) or ()) - {"base_optimizer"}, Any)
    built = isinstance(base, torch.optim.Optimizer)
    base_cls = type(base) if built else base
    base_args = [] if built else _init_keywords(base_cls)
    if base_args is None:  # the base takes **kwargs: it judges its own keywords
        return
    unknown = [k for k in kwargs if k not in own and k not in base_args]
    if not unknown:
        return
    if not info.sharpness_aware:
        raise TypeError(
            f"create('adamw') is plain torch.optim.AdamW: {', '.join(map(repr, unknown))} is not "
            f"one of its options ({', '.join(base_args)})"
        )
    passed_class = [k for k in unknown if isinstance(kwargs[k], type)]
    if passed_class:
        k, cls = passed_class[0], kwargs[passed_class[0]]
        named = (
            f"torch.optim.{cls.__name__}"
            if getattr(torch.optim, cls.__name__, None) is cls
            else cls.__name__
        )
        hint = (
            f"To build {info.name} over another optimizer pass base_optimizer={named} (not "
            f"{k}=); that optimizer's own options (e.g. momentum=) then go with the others"
        )
    else:
        close = difflib.get_close_matches(unknown[0], [*own, *base_args], n=1)
        hint = f"Did you mean {close[0]!r}?" if close else ""
        if base_cls is torch.optim.AdamW:
            hint += (
                " Another base optimizer's options go with base_optimizer=, e.g. "
                "create(name, model, base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)"
            )
    where = (
        f"the already-built {base_cls.__name__}'s are fixed"
        if built
        else f"base_optimizer={base_cls.__name__}'s: {', '.join(base_args)}"
    )
    raise TypeError(
        f"create({info.name!r}) got unknown keyword argument(s) {', '.join(map(repr, unknown))}: "
        f"{info.name}'s own options are {', '.join(info.options) or 'none'}; the engine's: "
        f"{', '.join(ENGINE_OPTIONS)}; {where}. {hint.strip()}".rstrip(". ")
        + "."
    )


def _init_keywords(cls: type) -> list[str] | None:
    """The keyword parameters of an optimizer class's ``__init__`` (not ``params``); None when
    it takes ``**kwargs`` (then any name may be its)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds]
    return [n for n in names if n not in ("self", "params")]
