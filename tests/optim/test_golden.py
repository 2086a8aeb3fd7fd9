"""Golden trajectories: the exact bits every method produces, pinned across refactors.

Each case trains a small MLP with dropout for a few steps (new data every step, a ρ schedule)
and hashes the returned losses, the parameters and every tensor of ``state_dict()``. A change
that alters any bit of any of them fails here.

The last bits of float32 arithmetic differ between CPU kinds (vector widths and library kernels
differ), so the file keeps each case's hashes per machine kind it was recorded on, plus the
losses and parameters themselves. A machine's kind is the hash of a fixed computation made
without flatlm (:func:`machine_kind`): on a recorded kind the hashes must match exactly; on any
other the values must agree to float32 rounding (``assert_close``), which still catches any
change of behaviour. When a change of behaviour is deliberate (a new default, a fixed bug),
regenerate the file (it then holds this machine kind's bits only) and say so in the commit; to
add this machine kind's bits to unchanged records (the values must agree), use --add-machine:

    PYTHONPATH=tests python tests/optim/test_golden.py --regenerate
    PYTHONPATH=tests python tests/optim/test_golden.py --add-machine
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from flatlm.optim import create
from flatlm.optim.state_layout import split
from helpers.optim import TinyMLP

GOLDEN = Path(__file__).with_name("golden_trajectories.json")
STEPS = 6

# name -> (method spec, create() keywords, protocol)
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "sam": ("sam", {}, "forward"),
    "asam": ("sam:adaptive=true", {}, "forward"),
    "fsam": ("fsam", {}, "forward"),
    "psam": ("psam:moment=previous", {}, "forward"),
    "psam_current": ("psam", {}, "forward"),
    "pfsam": ("pfsam:moment=previous", {}, "forward"),
    "pfsam_current": ("pfsam", {}, "forward"),
    "gasam": ("gasam:radius=ellipsoid,alpha=-1", {}, "forward"),
    "gasam_euclidean": ("gasam", {}, "forward"),
    "gasam_alpha_pos": ("gasam:alpha=1.0,normalize=false,radius=ellipsoid", {}, "forward"),
    "gasam_ascent3": ("gasam:ascent_steps=3,radius=ellipsoid,alpha=-1", {}, "forward"),
    "gasam_euclidean_ascent3": ("gasam:ascent_steps=3", {}, "forward"),
    "sam_ascent2": ("sam:ascent_steps=2", {}, "forward"),
    "sam_clip": ("sam", {"max_grad_norm": 0.05}, "forward"),
    "sam_fused": ("sam", {"fused": True}, "forward"),
    "psam_fused": ("psam:moment=previous", {"fused": True}, "forward"),
    "sam_no_replay": ("sam", {"replay_rng": False}, "forward"),
    "sam_every3": ("sam:perturb_every=3", {}, "forward"),
    "fsam_every3": ("fsam:perturb_every=3", {}, "forward"),
    "psam_every2": ("psam:perturb_every=2,moment=previous", {}, "forward"),
    "gasam_every3": ("gasam:perturb_every=3,radius=ellipsoid,alpha=-1", {}, "forward"),
    "gasam_ascent2_every2": (
        "gasam:ascent_steps=2,perturb_every=2,radius=ellipsoid,alpha=-1",
        {},
        "forward",
    ),
    "sam_micro3": ("sam", {}, "micro"),
    "fsam_micro3": ("fsam", {}, "micro"),
    "pfsam_micro3": ("pfsam:moment=previous", {}, "micro"),
    "gasam_micro3": ("gasam:normalize=false,radius=ellipsoid,alpha=-1", {}, "micro"),
    "fsam_every2_micro3": ("fsam:perturb_every=2", {}, "micro"),
    "sam_fp16_scaler": ("sam", {}, "scaler"),
    "fsam_fp16_scaler": ("fsam", {}, "scaler"),
    "gasam_fp16_scaler": ("gasam:radius=ellipsoid,alpha=-1", {}, "scaler"),
    "sam_every2_scaler": ("sam:perturb_every=2", {}, "scaler"),
    "sam_closure": ("sam", {}, "closure"),
    "gasam_closure_ascent2": ("gasam:ascent_steps=2,radius=ellipsoid,alpha=-1", {}, "closure"),
    "psam_two_phase": ("psam:moment=previous", {}, "two_phase"),
    "asam_two_phase": ("sam:adaptive=true", {}, "two_phase"),
    "asam_published": ("asam", {}, "forward"),
    "asam_published_ascent2": ("asam:ascent_steps=2", {}, "forward"),
    "msam": ("msam", {}, "forward"),
    "msam_preconditioned": ("msam:preconditioned=true", {}, "forward"),
    "mfsam": ("mfsam", {}, "forward"),
    "mpfsam": ("mpfsam", {}, "forward"),
    "msam_micro3": ("msam", {}, "micro"),
    "mfsam_micro3": ("mfsam", {}, "micro"),
    "msam_fp16_scaler": ("msam", {}, "scaler"),
    "msam_fused": ("msam", {"fused": True}, "forward"),
    "msam_closure": ("msam", {}, "closure"),
    "msam_two_phase": ("msam", {}, "two_phase"),
}


def _batch(step: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


def _hash(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _state_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested state dict, in a deterministic order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _state_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _state_tensors(v)]
    return []


def _in_recorded_order(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict's tensors grouped as the records were hashed (flatlm 0.2's layout: the
    base optimizer's state, then the method's own), so a new layout of the same bits matches."""
    parts = split(state_dict)
    return {"base": parts.base, "method_state": parts.method_state}


def run_case(name: str) -> dict[str, Any]:
    """The case's hashes (``losses``, ``params``, ``state``) and its ``values``: the losses and
    the parameters as floats, for the comparison on machines whose bits were never recorded."""
    spec, kwargs, protocol = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exactness must not depend on the machine's core count
    try:
        torch.manual_seed(0)
        model = TinyMLP(d_hidden=9, dropout=0.2)
        opt = create(spec, model.parameters(), lr=0.05, weight_decay=0.01, rho=0.1, **kwargs)
        # A scale near float32's limit: the first steps overflow and are skipped, then it backs off.
        scaler = (
            torch.amp.GradScaler("cpu", init_scale=3e38, growth_interval=2)
            if protocol == "scaler"
            else None
        )
        losses: list[torch.Tensor] = []
        for step in range(STEPS):
            for group in opt.param_groups:
                group["rho"] = 0.1 * (1 + step) / STEPS + 0.02  # a ρ schedule
            x, y = _batch(step)
            losses.append(_one_step(opt, model, x, y, protocol, scaler).detach().reshape(()))
        params = list(model.parameters())
        return {
            "losses": _hash(losses),
            "params": _hash(params),
            "state": _hash(_state_tensors(_in_recorded_order(opt.state_dict()))),
            "values": {
                "losses": [float(v) for v in losses],
                "params": [float(v) for p in params for v in p.detach().reshape(-1)],
            },
        }
    finally:
        torch.set_num_threads(threads)


def _one_step(opt, model, x, y, protocol: str, scaler) -> torch.Tensor:
    def loss_fn(logits: torch.Tensor, *_: Any) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    if protocol in ("forward", "scaler"):
        return opt.step(forward=lambda: model(x), loss_fn=loss_fn, grad_scaler=scaler)
    if protocol == "micro":
        mbs = list(zip(x.chunk(3), y.chunk(3), strict=True))
        return opt.step(
            forward=lambda mb: model(mb[0]),
            loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]),
            micro_batches=mbs,
        )
    closure: Callable[[], torch.Tensor]

    def closure() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    clean = closure()
    if protocol == "closure":
        opt.step(closure)
        return clean
    assert protocol == "two_phase"
    opt.first_step(zero_grad=True)
    closure()
    opt.second_step(zero_grad=True)
    return clean


HASHES = ("losses", "params", "state")
ROUNDING = 1e-4  # tolerance on other machine kinds (a change of behaviour moves values by ≫ 1e-3)


def machine_kind() -> str:
    """A fingerprint of how this machine rounds the arithmetic the cases use (tanh, dropout,
    matmul, cross-entropy, AdamW, foreach norms, powers and divisions), computed without flatlm:
    machines with equal fingerprints give equal bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = TinyMLP(d_hidden=9, dropout=0.2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
        out: list[torch.Tensor] = []
        for step in range(STEPS):
            x, y = _batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            scaled = torch._foreach_div(grads, norm)
            torch._foreach_addcmul_(scaled, grads, grads, value=0.3)
            torch._foreach_abs_(scaled)
            torch._foreach_sqrt_(scaled)
            torch._foreach_pow_(scaled, -0.5)
            out += [loss.detach(), norm, *scaled, 1.0 - torch.pow(0.99, torch.tensor(step + 1.0))]
            opt.step()
        return _hash([*out, *model.parameters()])[:16]
    finally:
        torch.set_num_threads(threads)


def _load() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def _bits(result: dict[str, Any]) -> dict[str, str]:
    return {k: result[k] for k in HASHES}


@pytest.fixture(scope="module")
def this_machine() -> str:
    return machine_kind()


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_is_bit_for_bit_the_recorded_one(name, this_machine):
    golden = _load()
    assert name in golden["values"], f"no golden record for {name}: regenerate (see docstring)"
    result = run_case(name)
    recorded = golden["machines"].get(this_machine)
    if recorded is not None and name in recorded:
        assert _bits(result) == recorded[name]  # a recorded machine kind: bit for bit
        return
    # Another CPU kind: the same trajectory up to float32 rounding.
    _assert_values_agree(name, result["values"], golden["values"][name])


def _assert_values_agree(name: str, got: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Losses and parameters equal up to float32 rounding, which GA-SAM's D (up to max_scale =
    100) amplifies to ~2e-5 in 6 steps (measured with ATEN_CPU_CAPABILITY=default)."""
    for key in ("losses", "params"):
        torch.testing.assert_close(
            torch.tensor(got[key]),
            torch.tensor(recorded[key]),
            rtol=ROUNDING,
            atol=ROUNDING,
            msg=lambda m, key=key: f"{name}: {key} differ from the record beyond rounding: {m}",
        )


def test_every_record_has_a_case():
    golden = _load()
    assert set(golden["values"]) == set(CASES)
    assert all(set(cases) <= set(CASES) for cases in golden["machines"].values())


def _write(golden: dict[str, Any]) -> None:
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    mode = sys.argv[1:]
    kind = machine_kind()
    results = {n: run_case(n) for n in sorted(CASES)}
    if mode == ["--regenerate"]:
        _write(
            {
                "machines": {kind: {n: _bits(r) for n, r in results.items()}},
                "values": {n: r["values"] for n, r in results.items()},
            }
        )
        print(f"wrote {GOLDEN} ({len(CASES)} cases, machine kind {kind} only)")
    elif mode == ["--add-machine"]:
        golden = _load()
        for n, r in results.items():
            if n in golden["values"]:
                _assert_values_agree(n, r["values"], golden["values"][n])
            else:
                golden["values"][n] = r["values"]
            golden["machines"].setdefault(kind, {})[n] = _bits(r)
        _write(golden)
        print(f"added machine kind {kind} to {GOLDEN} ({len(CASES)} cases)")
    else:
        raise SystemExit(
            "usage: PYTHONPATH=tests python tests/optim/test_golden.py --regenerate|--add-machine"
        )
