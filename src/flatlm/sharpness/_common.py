"""Shared plumbing: the model contract, parameter selection, batch weights, exact restoration.

Model contract (every public function of :mod:`flatlm.sharpness` follows it):

- ``model(inputs) -> logits`` of any shape ``(..., V)``; ``model`` is an ``nn.Module``;
- ``loss_fn(logits, targets) -> scalar`` mean loss of that batch;
- ``batches``: an iterable of ``(inputs, targets)``; it is materialised once, so a generator is
  fine. The loss over several batches is the token-weighted mean
  ``L = Σ_b n_b L_b / Σ_b n_b`` with ``n_b = targets.numel()`` (the mean over all target
  elements; for equal-sized batches it is the plain average of the batch losses).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
ParamSpec = str | Sequence[str] | Sequence[nn.Parameter] | None


@dataclass(frozen=True)
class Batch:
    """One batch with its weight ``n_b / N`` in the mean loss."""

    inputs: Tensor
    targets: Tensor
    weight: float
    count: int


def materialise_batches(batches: Iterable[tuple[Tensor, Tensor]]) -> list[Batch]:
    """Read the batches once and attach token weights, so every pass sees the same data."""
    raw = [(x, y) for x, y in batches]
    if not raw:
        raise ValueError("batches is empty")
    counts = [int(y.numel()) for _, y in raw]
    total = sum(counts)
    if total == 0:
        raise ValueError("batches hold no targets")
    return [Batch(x, y, c / total, c) for (x, y), c in zip(raw, counts, strict=True)]


def select_params(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Resolve a parameter selection to ``(name, parameter)`` pairs in model order.

    ``params`` is ``None`` (all trainable parameters), a pattern or a list of patterns matched
    against ``model.named_parameters()`` names (``fnmatch`` style, or a regular expression when
    prefixed with ``re:``, matched with ``re.search``), or a list of the parameters themselves.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif isinstance(params, str) or (
        isinstance(params, Sequence) and params and all(isinstance(s, str) for s in params)
    ):
        patterns = [params] if isinstance(params, str) else list(params)

        def hit(name: str) -> bool:
            for pat in patterns:
                if pat.startswith("re:"):
                    if re.search(pat[3:], name):
                        return True
                elif fnmatch.fnmatchcase(name, pat):
                    return True
            return False

        chosen = [(n, p) for n, p in named if hit(n)]
    else:
        wanted = {id(p) for p in params}  # type: ignore[union-attr]
        chosen = [(n, p) for n, p in named if id(p) in wanted]
        if len(chosen) != len(wanted):
            raise ValueError("some given parameters are not trainable parameters of the model")
    if not chosen:
        raise ValueError(f"no trainable parameter matches {params!r}")
    return chosen


def flat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector (the operators act on this flat space)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector back into tensors shaped like ``like``."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[i : i + n].view_as(t))
        i += n
    return out


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two tensor lists, accumulated in float64."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def norm(a: Sequence[Tensor]) -> Tensor:
    """Global L2 norm of a tensor list."""
    return dot(a, a).sqrt()


@contextmanager
def preserved(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Restore every parameter (bit for bit), every ``.grad`` and the train/eval flags on exit.

    Curvature of a stochastic function is ill-defined, so by default the model runs in eval
    mode (dropout off) inside and goes back to its own flags afterwards.
    """
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s, g in zip(params, saved, grads, strict=True):
                p.copy_(s)
                p.grad = g
        for m, t in modes:
            m.training = t


@contextmanager
def shifted(params: Sequence[Tensor], delta: Sequence[Tensor | None]) -> Iterator[None]:
    """Evaluate at θ + δ and put the exact saved θ back afterwards (never θ + δ − δ)."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True):
                if d is not None:
                    p.add_(d.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def batch_loss(model: nn.Module, loss_fn: LossFn, b: Batch) -> Tensor:
    """Weighted contribution ``w_b L_b`` of one batch to the mean loss."""
    return loss_fn(model(b.inputs), b.targets) * b.weight


def loss_value(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> float:
    """Mean loss over the batches, without building a graph."""
    with torch.no_grad():
        return float(sum(batch_loss(model, loss_fn, b).double() for b in batches))


def loss_and_grad(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Sequence[Tensor]
) -> tuple[float, list[Tensor]]:
    """Mean loss and its gradient w.r.t. ``params`` (via autograd.grad; ``p.grad`` untouched)."""
    total = 0.0
    grads = [torch.zeros_like(p) for p in params]
    for b in batches:
        loss = batch_loss(model, loss_fn, b)
        gs = torch.autograd.grad(loss, list(params), allow_unused=True)
        for acc, g in zip(grads, gs, strict=True):
            if g is not None:
                acc.add_(g)
        total += float(loss.detach().double())
    return total, grads
