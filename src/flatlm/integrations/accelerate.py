"""Sharpness-aware training in a raw Hugging Face Accelerate loop.

``AcceleratedOptimizer.step()`` cannot pass ``forward=``/``loss_fn=`` through, and a
sharpness-aware step needs every micro-batch of an update twice (at θ, then at θ + ε), while an
Accelerate loop hands them over one at a time. :class:`AcceleratedStep` holds the batches of an
update until Accelerate's gradient accumulation says the update is complete
(``accelerator.sync_gradients``, set by ``accelerator.accumulate(model)``), then runs the
engine's ``step(forward=, loss_fn=, micro_batches=...)`` over them with Accelerate's GradScaler
and its ``no_sync``:

>>> step = AcceleratedStep(accelerator, model, optimizer)   # after accelerator.prepare(...)
>>> for batch in loader:
...     with accelerator.accumulate(model):
...         loss = step(batch, forward=lambda b: model(b["x"]), loss_fn=lambda z, b: ...)
...     scheduler.step()

Everything else (device placement, autocast through the prepared model, the distributed
wrapper, ``save_state``/``load_state``, the prepared scheduler) is Accelerate's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn

from flatlm._extras import require
from flatlm.integrations import unwrap_optimizer

require("accelerate", "hf", feature="flatlm.integrations.accelerate")

__all__ = ["AcceleratedStep"]


class AcceleratedStep:
    """One sharpness-aware update per Accelerate accumulation cycle.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model (what ``forward`` calls; its ``no_sync`` keeps the non-last
            micro-batches of a pass from all-reducing).
        optimizer: the prepared optimizer (an ``AcceleratedOptimizer`` around a flatlm
            optimizer), or the flatlm optimizer itself. Preparing it is recommended:
            ``save_state``/``load_state`` then checkpoint it, and a step that fp16 skips is
            reported to it, so a prepared scheduler does not advance.

    Call it once per batch, inside ``accelerator.accumulate(model)``. On every batch but an
    update's last it only holds the batch and returns None; on the last (Accelerate's
    ``sync_gradients``: every ``gradient_accumulation_steps`` batches, and at the end of a
    prepared dataloader) it runs the whole step over the held batches, each weighted 1/M, and
    returns the clean loss (their mean). With ``Accelerator(mixed_precision="fp16")`` its
    GradScaler scales and unscales both passes; an overflow in either skips the step.
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any):
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.sam = unwrap_optimizer(optimizer, "AcceleratedStep")
        self._held: list[Any] = []

    @property
    def pending(self) -> int:
        """How many batches are held for the update under way."""
        return len(self._held)

    def clear(self) -> None:
        """Drop the held batches (a loop that stops in the middle of an update, as Accelerate
        drops the gradients accumulated so far)."""
        self._held = []

    def __call__(
        self,
        batch: Any,
        *,
        forward: Callable[[Any], Any],
        loss_fn: Callable[[Tensor, Any], Tensor],
    ) -> Tensor | None:
        """``forward(b)`` returns the logits of batch ``b`` (or ``(logits, aux_loss)``);
        ``loss_fn(logits, b)`` its loss."""
        self._held.append(batch)
        if not self.accelerator.sync_gradients:
            return None
        micro_batches, self._held = self._held, []
        scaler = getattr(self.accelerator, "scaler", None)
        skipped = self.sam.skipped_steps if scaler is not None else 0
        loss = self.sam.step(
            forward=forward,
            loss_fn=loss_fn,
            micro_batches=micro_batches,
            grad_scaler=scaler,
            no_sync=partial(self.accelerator.no_sync, self.model),
        )
        if scaler is not None and hasattr(self.optimizer, "_is_overflow"):
            # AcceleratedOptimizer.step_was_skipped: a prepared scheduler skips with the step.
            self.optimizer._is_overflow = self.sam.skipped_steps > skipped
        return loss
