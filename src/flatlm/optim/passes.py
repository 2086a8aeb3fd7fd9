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
    "call_loss_fn",
    "check_functional_graph",
    "check_loss",
    "clean_pass",
    "loss_input",
    "perturbed_pass",
    "replay",
    "split_output",
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


def vjp(
    logits: Tensor,
    dlogits: Tensor,
    *,
    aux: Tensor | None = None,
    weight: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """J(θ)ᵀ r: backpropagate the clean pass's dlogits through these logits (and, with
    ``aux``, the gradient of weight · aux at this point, scaled like the clean loss)."""
    if logits.shape != dlogits.shape:
        raise RuntimeError(
            f"forward() returned logits of shape {tuple(logits.shape)} at the perturbed point "
            f"but {tuple(dlogits.shape)} at the clean point"
        )
    if aux is None:
        logits.backward(dlogits.to(logits.dtype))
        return
    aux = aux * weight if weight != 1.0 else aux
    if scaler is not None:
        aux = scaler.scale(aux)
    torch.autograd.backward([logits, aux], [dlogits.to(logits.dtype), torch.ones_like(aux)])


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


def split_output(out: Any) -> tuple[Tensor, Tensor | None]:
    """``forward()``'s result as (logits, aux): the logits tensor alone, or ``(logits, aux)``
    with aux a scalar loss term that depends on the parameters directly (an L2 penalty, an MoE
    load-balancing loss), added to ``loss_fn(logits)``; or a model output with a ``logits``
    tensor (a Hugging Face ``ModelOutput``, a dict), whose logits are the pass's and which
    ``loss_fn`` receives whole (:func:`loss_input`)."""
    if isinstance(out, Tensor):
        return out, None
    if _is_model_output(out):
        return out["logits"], None
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
        aux = out[1]
        if aux is None:
            return out[0], None
        if isinstance(aux, Tensor) and aux.numel() == 1:
            return out[0], aux.reshape(())
    raise TypeError(
        "forward() must return the logits tensor, or a pair (logits, aux_loss) with aux_loss a "
        f"scalar tensor, or a model output with a 'logits' tensor (a Hugging Face ModelOutput: "
        f"call the model with return_dict=True); got {_describe(out)}"
    )


def _is_model_output(out: Any) -> bool:
    return isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor)


def loss_input(out: Any, logits: Tensor) -> Any:
    """What ``loss_fn`` is called with: ``logits``, or, when ``forward()`` returned a model
    output, that output with these logits (so ``loss_fn=lambda o: o.loss`` works where the
    pass backpropagates the model's own loss). A pass that needs the loss as a function of a
    detached copy of the logits gets the output with ``loss`` None: the loss must be computed
    from ``o.logits`` there (:func:`call_loss_fn` says so)."""
    if not _is_model_output(out) or out["logits"] is logits:
        return out if _is_model_output(out) else logits
    fields = {**out, "logits": logits}
    fields.pop("loss", None)
    try:
        return type(out)(**fields)
    except TypeError:  # a Mapping that is not built from keywords
        return fields


def call_loss_fn(loss_fn: Callable[[Any], Any], out: Any, logits: Tensor) -> Tensor:
    """``check_loss(loss_fn(loss_input(out, logits)))``, with what to write when a model output
    was given: ``loss_fn`` receives the output whole, and where the pass differentiates a
    detached copy of the logits its ``.loss`` is None."""
    given = loss_input(out, logits)
    if given is logits:
        return check_loss(loss_fn(given))
    name = type(out).__name__
    fix = (
        "compute the loss from o.logits, e.g. loss_fn=lambda o: F.cross_entropy("
        "o.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())"
    )
    try:
        loss = loss_fn(given)
    except (AttributeError, TypeError) as e:
        e.add_note(
            f"forward() returned a {name}: loss_fn receives it whole, not the logits tensor; "
            f"read o.logits (or o.loss, the model's own loss, for non-functional methods)"
        )
        raise
    if loss is None and given is out:
        raise ValueError(
            f"loss_fn returned None: the {name} has no loss (the model computes one only when "
            f"called with labels=, e.g. forward=lambda: model(x, labels=x)); or {fix}"
        )
    if loss is None:
        raise ValueError(
            f"loss_fn returned None: this step (a one-pass functional method's, or a functional "
            f"step that reuses its direction) needs the loss as a function of the logits alone, "
            f"so the {name}'s .loss is not available to it; {fix}"
        )
    return check_loss(loss)


def check_loss(loss: Any) -> Tensor:
    """The value of ``loss_fn``: a scalar tensor that requires grad, else a clear error."""
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {_describe(loss)}: compute the loss "
            "with torch ops on the logits (a Python number has no gradient)"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}: reduce it "
            "(e.g. .mean()) so each step has one loss"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn's value does not require grad: it must be computed from the logits "
            "forward() returns (is forward running under torch.no_grad()?)"
        )
    return loss


def check_functional_graph(loss: Tensor, logits: Tensor, aux: Tensor | None) -> None:
    """The functional methods backpropagate only r through the logits at θ+ε: a term of
    ``loss_fn`` that reaches a parameter without going through the logits would be dropped
    silently, and an ``aux`` that goes through the logits would be counted twice. Walks the
    autograd graph (once per optimizer: the graph's structure does not change between steps)."""
    if _reaches_leaf(loss, stop=logits):
        raise ValueError(
            "loss_fn depends on parameters other than through the logits (e.g. an L2 penalty or "
            "an auxiliary loss): the functional methods would drop that term. Return it from "
            "forward() instead, as forward=lambda: (logits, aux_loss); see docs/algorithms.md"
        )
    if aux is not None and logits.grad_fn is not None and _reaches(aux, logits.grad_fn):
        raise ValueError(
            "the aux_loss returned by forward() depends on the logits: put terms of the logits "
            "in loss_fn (the functional methods take their gradient through r), and only terms "
            "that bypass the logits in aux_loss"
        )


def _walk(root: Tensor, stop: Any = None) -> Iterator[Any]:
    seen: set[Any] = set()
    todo = [root.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node is stop:
            continue
        seen.add(node)
        yield node
        todo.extend(next_node for next_node, _ in node.next_functions)


def _reaches_leaf(root: Tensor, stop: Tensor) -> bool:
    return any(type(n).__name__ == "AccumulateGrad" for n in _walk(root, stop.grad_fn))


def _reaches(root: Tensor, node: Any) -> bool:
    return any(n is node for n in _walk(root))


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4])
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


def clean_pass(
    micro: Sequence[MicroBatch],
    *,
    functional: bool,
    scaler: torch.amp.GradScaler | None,
    rng_devices: list[int] | None,
    no_sync: NoSync | None = None,
    local: bool = False,
    parameter_grads: bool = True,
    check_graph: bool = False,
) -> CleanPass:
    """Forward–backward of every micro-batch at θ, each loss weighted 1/M.

    ``rng_devices``: the CUDA devices to record generator states of (None records none).
    ``parameter_grads=False``: no parameter gradient (a step with one gradient pass): for the
    functional methods only r(θ), from a no-grad forward and ℓ's gradient at the logits; for the
    others nothing runs (one forward per micro-batch later: no randomness to replay).
    ``check_graph``: see :func:`check_functional_graph`.
    """
    if not parameter_grads and not functional:
        return CleanPass([Recorded(None, None)] * len(micro), None, None)
    weight = 1.0 / len(micro)
    records: list[Recorded] = []
    total: Tensor | None = None
    ok: Tensor | None = None
    for i, mb in enumerate(micro):
        rng = RngState(rng_devices) if rng_devices is not None else None
        if parameter_grads:
            with torch.enable_grad(), sync_context(no_sync, i, len(micro), local=local):
                out = mb.forward()
                logits, aux = split_output(out)
                loss = call_loss_fn(mb.loss_fn, out, logits)
                if functional:
                    if check_graph:
                        check_functional_graph(loss, logits, aux)
                    logits.retain_grad()
                if aux is not None:
                    loss = loss + aux
                scaled_backward(loss, weight, scaler)
        else:
            with torch.no_grad():
                out = mb.forward()
                logits, aux = split_output(out)
            logits = logits.detach().requires_grad_()
            with torch.enable_grad():
                loss = call_loss_fn(mb.loss_fn, out, logits)
                scaled_backward(loss, weight, scaler)
            if aux is not None:
                loss = loss + aux
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
    dlogits r the VJP J(θ+ε)ᵀ r (plus the gradient of forward's aux loss there). Returns ``ok``
    and'ed with the finiteness of the perturbed losses, and their weighted sum (None for the
    VJP, which computes no loss)."""
    weight = 1.0 / len(micro)
    state: dict[str, Tensor | None] = {"ok": ok, "total": None}

    def run(i: int, record: Recorded) -> None:
        out = micro[i].forward()
        logits, aux = split_output(out)
        if record.dlogits is not None:
            vjp(logits, record.dlogits, aux=aux, weight=weight, scaler=scaler)
            return
        loss = call_loss_fn(micro[i].loss_fn, out, logits)
        if aux is not None:
            loss = loss + aux
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
                "the functional methods (fsam, pfsam, mfsam, mpfsam) need the model's logits: "
                "return a ModelOutput or a dict with 'logits' (return_dict=True), or the logits "
                f"tensor; got {_describe(output)} (a tuple does not say which item is the logits)"
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
