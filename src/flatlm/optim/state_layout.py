"""The layout of ``SharpnessAwareOptimizer.state_dict()``: torch's standard one, or flatlm 0.2's.

torch's layout (what ``state_dict()`` writes), which ``torch.distributed.checkpoint``
(``get_optimizer_state_dict``/``set_optimizer_state_dict``, ``save``/``load``) and any code that
reads a torch optimizer's checkpoint understand::

    {"state": {0: {"step": ..., "exp_avg": ..., "exp_avg_sq": ...,      # the base optimizer's
                   "flatlm_grad_sq_ema": ..., "flatlm_step": ...},      # the method's own
               ...},
     "param_groups": [{"lr": ..., "rho": ..., ...,
                       "flatlm_method": "GASAM", "flatlm_skipped_steps": 0,
                       "flatlm_steps_since_fresh_perturbation": 1,
                       "flatlm_fresh_steps": 7, "flatlm_reuse_steps": 0,
                       "flatlm_plain_steps": 3, "flatlm_policy": '{"name": ..., "t": 10}',
                       "params": [0, 1]},
                      ...]}

Each parameter's entry is the base optimizer's entry with the method's own state merged in, its
keys prefixed with :data:`PREFIX` so they cannot collide with the base's (GA-SAM's ``step`` and
Adam's). The optimizer-wide values (the method's name, the count of skipped steps, the steps since
the last fresh perturbation, the steps taken by kind, the step policy's host state as JSON) are
in every parameter group under :data:`PREFIX` keys, because ``get_optimizer_state_dict`` keeps
only ``state`` and ``param_groups``. The step counts and the policy's state came later
(:data:`OPTIONAL_SCALARS`): a checkpoint without them loads with zero counts and a fresh policy. The prefix has no ``.``:
``torch.distributed.checkpoint`` joins nested keys with dots when it flattens a state dict.

flatlm 0.2's layout (still loaded)::

    {"flatlm_method": "GASAM", "base": <base optimizer's state_dict()>,
     "method_state": {index: {...}}, "skipped_steps": 0, "steps_since_fresh_perturbation": 1}

Pure functions on plain dicts; the keys of ``state`` are whatever the groups' ``params`` list
(indices, or parameter names after ``torch.distributed.checkpoint``), passed through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The kinds of step, in the order of ``Scalars.step_counts`` (flatlm.optim.policies.KINDS).
KINDS = ("fresh", "reuse", "plain")

__all__ = [
    "LEGACY_KEYS",
    "OPTIONAL_SCALARS",
    "PREFIX",
    "SCALARS",
    "Parts",
    "Scalars",
    "is_legacy",
    "method_of",
    "policy_name",
    "split",
    "to_standard",
    "without_flatlm_keys",
]

#: Marks flatlm's entries in torch's layout: the method's per-parameter state keys and the
#: optimizer-wide values in the parameter groups.
PREFIX = "flatlm_"

#: The optimizer-wide values kept in every parameter group, as ``PREFIX + name``.
SCALARS = ("method", "skipped_steps", "steps_since_fresh_perturbation")
#: Written since step policies, optional when loading: ``PREFIX + name``.
OPTIONAL_SCALARS = ("fresh_steps", "reuse_steps", "plain_steps", "policy")

#: The keys that mark flatlm 0.2's layout (both are always there).
LEGACY_KEYS = ("base", "method_state")


@dataclass(frozen=True)
class Scalars:
    """The optimizer-wide values of a checkpoint (None method: not recorded, flatlm 0.2)."""

    method: str | None
    skipped_steps: int = 0
    steps_since_fresh_perturbation: int | None = None
    #: Steps taken by kind: (fresh, reuse, plain).
    step_counts: tuple[int, int, int] = (0, 0, 0)
    #: The step policy's ``dumps()`` (None: not recorded).
    policy: str | None = None


@dataclass(frozen=True)
class Parts:
    """A checkpoint split into what each object loads.

    ``base``: the base optimizer's state dict (torch's layout, no flatlm entries);
    ``method_state``: the method's own per-parameter state (keys unprefixed), by the same
    parameter keys as ``base``; ``scalars``: the optimizer-wide values.
    """

    base: dict[str, Any]
    method_state: dict[Any, dict[str, Any]]
    scalars: Scalars


def is_legacy(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is in flatlm 0.2's layout."""
    return all(key in state_dict for key in LEGACY_KEYS)


def to_standard(
    base: Mapping[str, Any], method_state: Mapping[Any, Mapping[str, Any]], scalars: Scalars
) -> dict[str, Any]:
    """torch's layout from the base optimizer's ``state_dict()``, the method's own state by the
    same parameter keys, and the optimizer-wide values."""
    state: dict[Any, dict[str, Any]] = {}
    for key, entry in base["state"].items():
        clash = [k for k in entry if isinstance(k, str) and k.startswith(PREFIX)]
        if clash:
            raise ValueError(
                f"the base optimizer's state has keys {clash} that start with {PREFIX!r}, which "
                "marks flatlm's own state in a checkpoint"
            )
        state[key] = dict(entry)
    for key, entry in method_state.items():
        merged = state.setdefault(key, {})
        merged.update({PREFIX + name: value for name, value in entry.items()})
    values = {PREFIX + name: getattr(scalars, name) for name in SCALARS}
    values.update(
        {PREFIX + name + "_steps": n for name, n in zip(KINDS, scalars.step_counts, strict=True)}
    )
    values[PREFIX + "policy"] = scalars.policy
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, **values, "params": group["params"]}
        for group in base["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def split(state_dict: Mapping[str, Any]) -> Parts:
    """The parts of a checkpoint in either layout (checked beforehand: ``check_state_dict``)."""
    if is_legacy(state_dict):
        return Parts(
            base=dict(state_dict["base"]),
            method_state=dict(state_dict["method_state"]),
            scalars=Scalars(
                state_dict.get("flatlm_method"),
                int(state_dict.get("skipped_steps") or 0),
                _optional_int(state_dict.get("steps_since_fresh_perturbation")),
                _counts(state_dict, ""),
                state_dict.get("policy"),
            ),
        )
    base_state: dict[Any, dict[str, Any]] = {}
    method_state: dict[Any, dict[str, Any]] = {}
    for key, entry in state_dict["state"].items():
        base_state[key] = {k: v for k, v in entry.items() if not _ours(k)}
        own = {k[len(PREFIX) :]: v for k, v in entry.items() if _ours(k)}
        if own:
            method_state[key] = own
    groups = state_dict["param_groups"]
    first = groups[0] if groups else {}
    return Parts(
        base={"state": base_state, "param_groups": [without_flatlm_keys(g) for g in groups]},
        method_state=method_state,
        scalars=Scalars(
            first.get(PREFIX + "method"),
            int(first.get(PREFIX + "skipped_steps") or 0),
            _optional_int(first.get(PREFIX + "steps_since_fresh_perturbation")),
            _counts(first, PREFIX),
            first.get(PREFIX + "policy"),
        ),
    )


def method_of(state_dict: Mapping[str, Any]) -> str | None:
    """The method a checkpoint in either layout was saved by (None: not recorded)."""
    if is_legacy(state_dict):
        return state_dict.get("flatlm_method")
    groups = state_dict.get("param_groups") or [{}]
    return groups[0].get(PREFIX + "method") if isinstance(groups[0], Mapping) else None


def without_flatlm_keys(group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group without flatlm's optimizer-wide values (what the base optimizer loads,
    and what the live groups keep)."""
    return {k: v for k, v in group.items() if not _ours(k)}


def _ours(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX)


def policy_name(policy: str | None) -> str | None:
    """The name in a saved policy state (None: none saved)."""
    return None if policy is None else json.loads(policy).get("name")


def _counts(entries: Mapping[str, Any], prefix: str) -> tuple[int, int, int]:
    c = [int(entries.get(f"{prefix}{kind}_steps") or 0) for kind in KINDS]
    return c[0], c[1], c[2]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
