"""Sharpness-aware training in PyTorch Lightning, through manual optimization.

>>> class LitModel(SharpnessAwareMixin, pl.LightningModule):
...     def configure_optimizers(self):
...         return flatlm.optim.create("fsam", self, lr=1e-3)
...     def training_step(self, batch, batch_idx):
...         x, y = batch
...         return self.sharpness_aware_step(
...             forward=lambda: self(x), loss_fn=lambda logits: F.cross_entropy(logits, y)
...         )

Why manual optimization: Lightning's automatic optimization hands the optimizer a closure that
runs ``training_step`` and the backward (``optimizer.step(closure=...)``), and under 16-bit
mixed precision runs it first and then calls ``optimizer.step()`` through the GradScaler. Either
way the optimizer cannot run the two passes of a sharpness-aware step itself, and the functional
methods cannot see the clean pass's dlogits. Under manual optimization
:func:`sharpness_aware_step` hands the whole step to the engine's ``step(forward=, loss_fn=)``,
with what Lightning set up:

- the precision plugin: ``training_step`` already runs under its autocast (``bf16-mixed``,
  ``16-mixed``); a ``16-mixed`` plugin's GradScaler becomes the step's ``grad_scaler`` (both
  passes scaled and unscaled, an overflow skips the step, the scaler updated once; Lightning
  saves it in checkpoints);
- the DDP strategy: after each forward the strategy's ``pre_backward`` prepares the DDP reducer
  (what ``manual_backward`` does), so each pass all-reduces, once, on its last micro-batch; the
  other micro-batches run under the strategy's ``block_backward_sync``;
- Lightning's step bookkeeping (``global_step``, ``max_steps``, the profiler) and the
  ``on_before_optimizer_step`` hooks (called with the perturbed gradient, after flatlm's
  clipping, before AdamW steps).

Gradient clipping is the flatlm optimizer's ``max_grad_norm`` (it clips the gradient AdamW steps
with, the perturbed one): Lightning refuses ``Trainer(gradient_clip_val=...)`` under manual
optimization. Gradient accumulation is ``accumulate=N`` here (Lightning refuses
``accumulate_grad_batches`` under manual optimization). Checkpoints are Lightning's own: the
optimizer's ``state_dict`` holds AdamW's moments and the method's state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from flatlm._extras import MissingExtraError
from flatlm.integrations import unwrap_optimizer
from flatlm.optim import SharpnessAwareOptimizer
from flatlm.optim.validation import LIGHTNING_AUTOMATIC_OPTIMIZATION

try:
    import pytorch_lightning  # noqa: F401  (or the unified package, lightning.pytorch)
except ImportError as e:  # pragma: no cover - exercised in tests/test_packaging.py's bare child
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        raise MissingExtraError(
            "pytorch_lightning", "lightning", feature="flatlm.integrations.lightning", cause=e
        ) from e

__all__ = ["AUTOMATIC_OPTIMIZATION_ERROR", "SharpnessAwareMixin", "sharpness_aware_step"]

# Defined in the core, which raises it when Lightning's closure reaches the engine.
AUTOMATIC_OPTIMIZATION_ERROR = LIGHTNING_AUTOMATIC_OPTIMIZATION

# Strategies whose parameters are whole on every process: the perturbation's global norms are
# then right. Sharded ones (FSDP, DeepSpeed, model parallel) and XLA's are refused.
_SUPPORTED = ("SingleDeviceStrategy", "DDPStrategy")
_REFUSED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


@dataclass
class _Stash:
    """The micro-batches of an update under ``accumulate=N``, held until its N-th batch."""

    epoch: tuple[int, int]  # (id of the trainer, epoch): a stash never crosses an epoch or a fit
    calls: int = 0
    micro_batches: list[Any] = field(default_factory=list)


def sharpness_aware_step(
    module: Any,
    forward: Callable[..., Any],
    loss_fn: Callable[..., Tensor],
    *,
    micro_batches: Sequence[Any] | None = None,
    accumulate: int = 1,
    optimizer: Any = None,
) -> Tensor | None:
    """One sharpness-aware step of ``module``'s flatlm optimizer, from its ``training_step``.

    Args:
        module: the ``LightningModule`` (manual optimization).
        forward, loss_fn: as for ``SharpnessAwareOptimizer.step``: ``forward()`` returns the
            logits (or ``(logits, aux_loss)``), ``loss_fn(logits)`` the loss; with
            ``micro_batches``, ``forward(mb)`` and ``loss_fn(logits, mb)``.
        micro_batches: this batch split into micro-batches (each loss weighted 1/M), or
            ``[batch]`` with ``accumulate``.
        accumulate: gradient accumulation over ``accumulate`` consecutive ``training_step``
            calls (Lightning's ``accumulate_grad_batches``, which it refuses under manual
            optimization): their micro-batches are held and the step runs on the last one (or
            on the epoch's last batch) over all of them; the other calls return None.
        optimizer: the flatlm optimizer (or its ``LightningOptimizer``) when the module has
            several.

    Returns the clean loss of the step (the mean over its micro-batches), or None when the batch
    was only held for a later step.
    """
    if getattr(module, "automatic_optimization", False):
        raise RuntimeError(AUTOMATIC_OPTIMIZATION_ERROR)
    module.__dict__["_flatlm_called"] = True  # SharpnessAwareMixin.on_train_batch_end checks it
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ValueError(f"accumulate must be a whole number ≥ 1, got {accumulate!r}")
    trainer = module.trainer
    strategy = trainer.strategy
    _check_strategy(strategy)
    lightning_opt = _lightning_optimizer(module, optimizer)
    sam = unwrap_optimizer(lightning_opt, "sharpness_aware_step")

    if accumulate > 1:
        if micro_batches is None:
            raise TypeError(
                "accumulate > 1 holds the batches of several training_step calls: pass "
                "micro_batches=[batch] with forward(mb) and loss_fn(logits, mb)"
            )
        stash = _stash_of(module, sam, trainer)
        stash.calls += 1
        stash.micro_batches.extend(micro_batches)
        if stash.calls < accumulate and not trainer.is_last_batch:
            return None
        micro_batches = list(stash.micro_batches)
        stash.calls, stash.micro_batches = 0, []

    ddp = strategy.model if isinstance(strategy.model, DistributedDataParallel) else None
    if ddp is not None:
        if getattr(ddp, "static_graph", False):
            raise ValueError(
                "DDPStrategy(static_graph=True) is not supported: Lightning flushes its first "
                "all-reduce in manual_backward, which the sharpness-aware step does not call; "
                "use the default static_graph=False"
            )
        forward = _preparing_backward(forward, strategy)
    scaler = getattr(strategy.precision_plugin, "scaler", None)
    hook = sam.base_optimizer.register_step_pre_hook(
        lambda *_: _before_optimizer_step(trainer, module, sam)
    )
    bookkeeping = getattr(lightning_opt, "_on_before_step", None) is not None
    if bookkeeping:
        lightning_opt._on_before_step()  # Lightning's step count (global_step) and profiler
    try:
        loss = sam.step(
            forward=forward,
            loss_fn=loss_fn,
            micro_batches=micro_batches,
            grad_scaler=scaler,
            no_sync=strategy.block_backward_sync if ddp is not None else None,
        )
    finally:
        hook.remove()
    if bookkeeping:
        lightning_opt._on_after_step()
    return loss


class SharpnessAwareMixin:
    """A ``LightningModule`` mixin: manual optimization and :meth:`sharpness_aware_step`.

    Put it first: ``class LitModel(SharpnessAwareMixin, pl.LightningModule)``. It sets
    ``automatic_optimization = False``; a module switched back to automatic optimization fails at
    its first step with an error saying why (never a wrong step).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        module = next((i for i, c in enumerate(mro) if _is_lightning_module_class(c)), None)
        if module is not None and module < mro.index(SharpnessAwareMixin):
            raise TypeError(
                f"{cls.__name__}: put SharpnessAwareMixin first in the bases, "
                f"class {cls.__name__}(SharpnessAwareMixin, {mro[module].__name__}): after "
                f"{mro[module].__name__} its __init__ and hooks never run, so the module stays "
                "under automatic optimization"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def configure_callbacks(self) -> Any:
        """Lightning calls this hook before it checks the Trainer's settings: the two settings
        manual optimization refuses are refused here first, with flatlm's fix (Lightning's
        advice, automatic optimization, cannot run a sharpness-aware step)."""
        _check_trainer_settings(self.trainer)
        return super().configure_callbacks()  # type: ignore[misc]

    def sharpness_aware_step(
        self,
        forward: Callable[..., Any],
        loss_fn: Callable[..., Tensor],
        *,
        micro_batches: Sequence[Any] | None = None,
        accumulate: int = 1,
        optimizer: Any = None,
    ) -> Tensor | None:
        """See :func:`sharpness_aware_step`."""
        return sharpness_aware_step(
            self,
            forward,
            loss_fn,
            micro_batches=micro_batches,
            accumulate=accumulate,
            optimizer=optimizer,
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning calls this hook only under automatic optimization: refuse it."""
        raise RuntimeError(AUTOMATIC_OPTIMIZATION_ERROR)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a first batch after which nothing has stepped (see :func:`_check_stepped`)."""
        _check_stepped(self)
        super().on_train_batch_end(*args, **kwargs)  # type: ignore[misc]


# --- helpers ------------------------------------------------------------------------------------


def _check_stepped(module: Any) -> None:
    """Under manual optimization only ``training_step`` steps an optimizer: one that never
    calls ``sharpness_aware_step`` (nor steps one itself) trains nothing, and Lightning's
    ``global_step``, which ``max_steps`` counts, never moves (``fit`` would not return).
    Checked while no optimizer has stepped yet, so a batch skipped on purpose later is fine."""
    if module.trainer.global_step == 0 and not module.__dict__.get("_flatlm_called"):
        raise RuntimeError(
            f"{type(module).__name__}.training_step returned without calling "
            "self.sharpness_aware_step(forward=..., loss_fn=...) and no optimizer has stepped: "
            "under manual optimization (which SharpnessAwareMixin sets) nothing else steps the "
            "optimizer, so nothing would train and Trainer(max_steps=...) would never be reached"
        )


def _is_lightning_module_class(cls: type) -> bool:
    return cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in (
        "pytorch_lightning",
        "lightning",
    )


def _check_trainer_settings(trainer: Any) -> None:
    """``gradient_clip_val`` and ``accumulate_grad_batches``, which Lightning applies only under
    automatic optimization: their flatlm counterparts."""
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        raise ValueError(
            f"Trainer(gradient_clip_val={clip}) is Lightning's clipping, which runs only under "
            "automatic optimization: drop it and clip in the flatlm optimizer, "
            f"flatlm.optim.create(name, self, ..., max_grad_norm={clip}) in configure_optimizers "
            "(it clips the gradient AdamW steps with); see docs/lightning.md"
        )
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={accumulate}) runs only under automatic "
            "optimization: drop it and pass micro_batches=[batch] and "
            f"accumulate={accumulate} to self.sharpness_aware_step; see docs/lightning.md"
        )


def _check_strategy(strategy: Any) -> None:
    names = {c.__name__ for c in type(strategy).__mro__}
    if names & set(_REFUSED) or not names & set(_SUPPORTED):
        raise ValueError(
            f"flatlm.integrations.lightning supports the single-device and DDP strategies; "
            f"{type(strategy).__name__} shards or places the parameters differently, so the "
            "perturbation's global norms would be wrong"
        )


def _lightning_optimizer(module: Any, optimizer: Any) -> Any:
    """The ``LightningOptimizer`` of ``optimizer`` (default: the module's only optimizer)."""
    wrapped = module.optimizers(use_pl_optimizer=True)
    candidates = wrapped if isinstance(wrapped, list) else [wrapped]
    if optimizer is None:
        if len(candidates) != 1:
            raise ValueError(
                f"the module has {len(candidates)} optimizers: pass optimizer= to say which one "
                "takes the sharpness-aware step"
            )
        return candidates[0]
    target = unwrap_optimizer(optimizer, "sharpness_aware_step")
    for candidate in candidates:
        if unwrap_optimizer(candidate, "sharpness_aware_step") is target:
            return candidate
    raise ValueError("optimizer= is not one of the module's optimizers (configure_optimizers)")


def _stash_of(module: Any, sam: SharpnessAwareOptimizer, trainer: Any) -> _Stash:
    stashes: dict[int, _Stash] = module.__dict__.setdefault("_flatlm_stashes", {})
    epoch = (id(trainer), int(trainer.current_epoch))
    stash = stashes.get(id(sam))
    if stash is None or stash.epoch != epoch:
        stash = stashes[id(sam)] = _Stash(epoch)
    return stash


def _preparing_backward(forward: Callable[..., Any], strategy: Any) -> Callable[..., Any]:
    """``forward``, then the strategy's ``pre_backward`` on its output: under DDP that prepares
    the reducer for the backward that follows (as ``manual_backward`` does), unless the step is
    inside ``block_backward_sync`` (a micro-batch that must not all-reduce)."""

    def wrapped(*args: Any) -> Any:
        out = forward(*args)
        if torch.is_grad_enabled():
            strategy.pre_backward(out)
        return out

    return wrapped


def _before_optimizer_step(trainer: Any, module: Any, optimizer: SharpnessAwareOptimizer) -> None:
    """Lightning's ``on_before_optimizer_step`` hooks (callbacks, then the module), as its
    precision plugins call them before an optimizer steps."""
    call = importlib.import_module(type(trainer).__module__.rsplit(".", 1)[0] + ".call")
    call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
    call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
