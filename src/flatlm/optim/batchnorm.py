"""Running statistics of normalisation layers across a step's two passes.

A sharpness-aware step runs the forward twice, at θ and at θ + ε. A ``BatchNorm`` layer in
training mode normalises with the batch's own statistics either way (so the gradients are what
they should be), but it also updates its running mean and variance on *every* forward: once at
θ and once more at the perturbed point, which the eval-mode model then uses. pytorch_optimizer
ships ``disable_running_stats``/``enable_running_stats`` for this (momentum set to 0, which still
counts the batch and turns the running statistics NaN when the perturbed pass overflows); here:

- :func:`frozen_running_stats`: a context manager under which the model's normalisation layers
  normalise exactly as in training but leave their running statistics (and
  ``num_batches_tracked``) untouched;
- :func:`update_stats_once`: a ``forward`` for ``step(forward=...)`` that lets each micro-batch's
  first forward of the step (the clean pass, at θ) update the statistics and freezes every later
  one (the perturbed pass, further ascent steps). After a step with it the running statistics
  equal those after one plain training forward per micro-batch at θ.

>>> opt.step(forward=update_stats_once(model, lambda: model(x)), loss_fn=...)

Neither knows anything of the optimizer: they work with any protocol that calls the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

__all__ = ["frozen_running_stats", "tracking_layers", "update_stats_once"]

T = TypeVar("T")


def tracking_layers(model: nn.Module) -> list[_NormBase]:
    """The layers whose next forward would update running statistics: ``BatchNorm*d``,
    ``SyncBatchNorm``, ``InstanceNorm*d(track_running_stats=True)``, in training mode."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _NormBase)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
    ]


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside, the model's normalisation layers leave their running statistics alone.

    Batch norm (``_BatchNorm``, ``SyncBatchNorm``) is switched to ``track_running_stats=False``:
    in training mode it then normalises with the batch statistics, as it does anyway, and
    updates nothing (not even ``num_batches_tracked``). Instance norm with running statistics
    normalises with the instance statistics in training mode; its running buffers are taken
    away for the duration (``F.instance_norm`` updates whatever buffers it is given). Outputs and
    gradients are bit for bit those of an unfrozen forward; everything is restored on exit, also
    after an exception. Under ``torch.compile`` the switch is one more guard: the frozen variant
    compiles once, and later steps reuse both graphs.
    """
    layers = tracking_layers(model)
    swapped: list[tuple[_NormBase, Any, Any]] = []
    try:
        for m in layers:
            if isinstance(m, _BatchNorm):
                m.track_running_stats = False
            else:
                swapped.append((m, m._buffers["running_mean"], m._buffers["running_var"]))
                m._buffers["running_mean"] = None
                m._buffers["running_var"] = None
        yield
    finally:
        for m in layers:
            if isinstance(m, _BatchNorm):
                m.track_running_stats = True
        for m, mean, var in swapped:
            m._buffers["running_mean"] = mean
            m._buffers["running_var"] = var


def update_stats_once(model: nn.Module, forward: Callable[..., T]) -> Callable[..., T]:
    """``forward`` whose first call per micro-batch updates the running statistics and whose
    later calls with the same micro-batch run under :func:`frozen_running_stats`.

    ``step(forward=...)`` calls ``forward()`` (or ``forward(mb)`` for each micro-batch) first in
    the clean pass at θ, then again at θ + ε (once per ascent step): with this wrapper only the
    clean pass moves the statistics. Build it in each step, as the forward itself is
    (``forward=update_stats_once(model, lambda: model(x))``): it remembers which micro-batches it
    has seen (holding them until it is dropped). With ``perturb_every > 1`` a SAM-type method's
    step that reuses the stored direction has no clean pass; its one forward (at θ + ρδ) then
    updates the statistics, so they keep following training.
    """
    seen: list[Any] = []  # the micro-batches already forwarded (by identity; held, so no id reuse)

    def wrapped(*args: Any, **kwargs: Any) -> T:
        key = args[0] if args else _NO_ARGUMENT
        if any(key is s for s in seen):
            with frozen_running_stats(model):
                return forward(*args, **kwargs)
        seen.append(key)
        return forward(*args, **kwargs)

    return wrapped


_NO_ARGUMENT = object()
