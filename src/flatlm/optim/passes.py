"""The pass protocol: the clean pass and the perturbed pass over micro-batches.

Everything that makes the second pass evaluate the *same function* as the first lives here, and
the engine and every integration use it:

- :class:`RngState`: the clean pass's generator states, replayed before the perturbed pass so
  dropout draws the same masks;
- the functional methods' dlogits r = ∂ℓ/∂logits, taken in the clean pass (``retain_grad`` on
  the logits, or :class:`LogitsCapture` where someone else runs the backward), and sent back
  through the perturbed point's logits as a vector–Jacobian product (:func:`vjp`);
- DDP: all-reduce once per pass, on the last micro-batch (:func:`sync_context`);
- :func:`replay`: the perturbed pass's loop over the recorded micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from flatlm.optim.amp import scaled_backward

__all__ = [
    "CleanPass",
    "LogitsCapture",
    "MicroBatch",
    "Recorded",
    "RngState",
    "clean_pass",
    "perturbed_pass",
    "replay",
    "sync_context",
    "vjp",
]

NoSync = Callable[[], AbstractContextManager]


class RngState:
    """The CPU and CUDA generator states, so the second pass sees the first pass's randomness."""

    def __init__(self, cuda_devices: Sequence[int] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def cuda_devices(params: Iterator[Tensor] | Sequence[Tensor]) -> list[int]:
    """The CUDA devices whose generators a pass over ``params`` may draw from."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return sorted({p.device.index or 0 for p in params if p.is_cuda})


@dataclass
class MicroBatch:
    """One micro-batch of a step: ``forward()`` gives the logits, ``loss_fn(logits)`` the loss."""

    forward: Callable[[], Tensor]
    loss_fn: Callable[[Tensor], Tensor]


def micro_batches_of(
    forward: Callable[..., Tensor],
    loss_fn: Callable[..., Tensor],
    micro_batches: Sequence[Any] | None,
) -> list[MicroBatch]:
    """``step``'s arguments as micro-batches: one, or ``forward(mb)``/``loss_fn(logits, mb)``."""
    if micro_batches is None:
        return [MicroBatch(forward, loss_fn)]
    out = [MicroBatch(partial(forward, mb), partial(_loss_of, loss_fn, mb)) for mb in micro_batches]
    if not out:
        raise ValueError("micro_batches is empty")
    return out


def _loss_of(loss_fn: Callable[..., Tensor], mb: Any, logits: Tensor) -> Tensor:
    return loss_fn(logits, mb)


@dataclass
class Recorded:
    """What the perturbed pass needs to replay one clean micro-batch exactly."""

    rng: RngState | None
    dlogits: Tensor | None


@dataclass
class CleanPass:
    """The clean pass's records (one per micro-batch), mean loss and finiteness flag."""

    records: list[Recorded]
    loss: Tensor | None
    ok: Tensor | None


def sync_context(
    no_sync: NoSync | None, index: int, count: int, *, local: bool = False
) -> AbstractContextManager:
    """DDP: all-reduce once per pass, on the last micro-batch; never in ``local`` mode."""
    skip = no_sync is not None and (index < count - 1 or local)
    return no_sync() if skip else nullcontext()  # type: ignore[misc]


def vjp(logits: Tensor, dlogits: Tensor) -> None:
    """J(θ)ᵀ r: backpropagate the clean pass's dlogits through these logits."""
    if logits.shape != dlogits.shape:
        raise RuntimeError(
            f"forward() returned logits of shape {tuple(logits.shape)} at the perturbed point "
            f"but {tuple(dlogits.shape)} at the clean point"
        )
    logits.backward(dlogits.to(logits.dtype))


def replay(
    records: Sequence[Recorded],
    run: Callable[[int, Recorded], None],
    no_sync: NoSync | None = None,
) -> None:
    """The perturbed pass's loop: for each recorded micro-batch, its RNG state back, then ``run``
    (all-reducing only on the last micro-batch)."""
    for i, record in enumerate(records):
        if record.rng is not None:
            record.rng.restore()
        with torch.enable_grad(), sync_context(no_sync, i, len(records)):
            run(i, record)


def _add_weighted(total: Tensor | None, loss: Tensor, weight: float) -> Tensor:
    """total + weight·loss, starting from None (the running mean of micro-batch losses)."""
    return loss * weight if total is None else total + loss * weight


def _all_finite(ok: Tensor | None, value: Tensor) -> Tensor:
    finite = torch.isfinite(value).all()
    return finite if ok is None else ok & finite


def clean_pass(
    micro: Sequence[MicroBatch],
    *,
    functional: bool,
    scaler: torch.amp.GradScaler | None,
    rng_devices: list[int] | None,
    no_sync: NoSync | None = None,
    local: bool = False,
    parameter_grads: bool = True,
) -> CleanPass:
    """Forward–backward of every micro-batch at θ, each loss weighted 1/M.

    ``rng_devices``: the CUDA devices to record generator states of (None records none).
    ``parameter_grads=False``: only r(θ), from a no-grad forward and ℓ's gradient at the logits
    (what a functional step that reuses a stored direction needs from θ).
    """
    weight = 1.0 / len(micro)
    records: list[Recorded] = []
    total: Tensor | None = None
    ok: Tensor | None = None
    for i, mb in enumerate(micro):
        rng = RngState(rng_devices) if rng_devices is not None else None
        if parameter_grads:
            with torch.enable_grad(), sync_context(no_sync, i, len(micro), local=local):
                logits = mb.forward()
                loss = mb.loss_fn(logits)
                if functional:
                    logits.retain_grad()
                scaled_backward(loss, weight, scaler)
        else:
            with torch.no_grad():
                logits = mb.forward()
            logits = logits.detach().requires_grad_()
            with torch.enable_grad():
                loss = mb.loss_fn(logits)
                scaled_backward(loss, weight, scaler)
        # r of the weighted (and scaled) loss: the second pass's VJP carries the same factors.
        records.append(Recorded(rng, logits.grad.detach() if functional else None))
        del logits
        loss = loss.detach()
        total = _add_weighted(total, loss, weight)
        ok = _all_finite(ok, loss)
    return CleanPass(records, total, ok)


def perturbed_pass(
    micro: Sequence[MicroBatch],
    records: Sequence[Recorded],
    *,
    scaler: torch.amp.GradScaler | None,
    no_sync: NoSync | None,
    ok: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """Forward–backward of every micro-batch at the perturbed point: ∇L, or where the record has
    dlogits r the VJP J(θ+ε)ᵀ r. Returns ``ok`` and'ed with the finiteness of the perturbed
    losses, and their weighted sum (None for the VJP, which computes no loss)."""
    weight = 1.0 / len(micro)
    state: dict[str, Tensor | None] = {"ok": ok, "total": None}

    def run(i: int, record: Recorded) -> None:
        logits = micro[i].forward()
        if record.dlogits is not None:
            vjp(logits, record.dlogits)
            return
        loss = micro[i].loss_fn(logits)
        scaled_backward(loss, weight, scaler)
        loss = loss.detach()
        state["ok"] = _all_finite(state["ok"], loss)
        state["total"] = _add_weighted(state["total"], loss, weight)

    replay(records, run, no_sync)
    return state["ok"], state["total"]


def _logits_of(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        return logits if isinstance(logits, Tensor) else None
    return None


class LogitsCapture:
    """Catches a model's logits on its forward (a hook) and, if asked, their gradient r, for
    loops where someone else runs the forward and backward (the HF Trainer).

    With mixed precision, accelerate returns float32 copies of half-precision outputs; a model
    that computes its own loss does so from the half-precision logits, so the copy is off the
    loss path. r is then read at the copy's input (a hook on the autograd node that made the
    half-precision logits) and the second pass sends ``r.float()`` back through the copy, which
    casts it to exactly r again.
    """

    def __init__(self, model: nn.Module, want_grad: bool):
        self.logits: Tensor | None = None
        self.dlogits: Tensor | None = None
        self._want_grad = want_grad
        self._handles: list[Any] = [model.register_forward_hook(self._on_forward)]

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        logits = _logits_of(output)
        if logits is None:
            raise RuntimeError(
                "the functional methods (fsam, pfsam) need the model to return its logits: a "
                "ModelOutput or dict with 'logits' (return_dict=True), or a tensor"
            )
        self.logits = logits
        if not self._want_grad:
            return
        fn = logits.grad_fn
        if fn is None:
            raise RuntimeError("the model's logits do not require grad")
        source = fn.next_functions[0] if fn.next_functions else (None, 0)
        if (
            type(fn).__name__ == "ToCopyBackward0"
            and logits.dtype == torch.float32
            and source[0] is not None
        ):
            self._handles.append(source[0].register_prehook(partial(self._from_node, source[1])))
        else:
            self._handles.append(logits.register_hook(self._from_tensor))

    def _from_tensor(self, grad: Tensor) -> None:
        self.dlogits = grad.detach()

    def _from_node(self, index: int, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = grad_outputs[index]
        self.dlogits = None if grad is None else grad.detach()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
