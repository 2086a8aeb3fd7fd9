"""Sharpness-aware training inside the Hugging Face ``transformers.Trainer``.

>>> from flatlm.integrations.hf import SharpnessAwareTrainer
>>> trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=ds, sam_method="fsam")
>>> trainer.train()

One update over the Trainer's M accumulation micro-batches:

1. ``training_step`` (called M times by the Trainer) runs the Trainer's own clean forward and
   backward and stashes what the second pass needs: the inputs, ``num_items_in_batch``, the RNG
   state from before the forward and, for the functional methods, the dlogits r. For bSAM the
   first of them moves θ to the noisy point θ + e (``add_noise``), which ``first_step`` undoes.
2. The Trainer calls ``optimizer.step()``. The optimizer is :class:`SharpnessAwareStep`, whose
   ``step`` runs ``first_step`` (θ → θ+ε from the gradient accumulated over all M micro-batches),
   replays the M micro-batches at θ+ε (same inputs, same RNG, and the Trainer's own
   ``training_step`` again, so the loss is scaled exactly as in the clean pass; for the
   functional methods a forward and ``logits.backward(r)``), then ``second_step`` (θ restored,
   the perturbed gradient clipped, AdamW steps).

Everything else (LR schedule, logging, evaluation, checkpoints, resuming) is the Trainer's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

try:
    import accelerate  # noqa: F401  (the Trainer's own dependency; checked here for the message)
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatlm.integrations.hf needs transformers and accelerate: pip install 'flatlm[hf]'"
    ) from e

from flatlm.optim import NonFiniteStepWarning, SharpnessAwareOptimizer, amp, passes, sharded
from flatlm.optim.directions import global_norm
from flatlm.optim.registry import check_options, create, method_info, parse_method

__all__ = ["SharpnessAwareStep", "SharpnessAwareTrainer", "SharpnessAwareTrainerMixin"]

# TrainingArguments.optim values whose optimizer the flatlm methods can stand in for.
_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
# Keys the Trainer's arguments decide; in sam_kwargs they would silently disagree with them.
_FROM_ARGS = ("lr", "betas", "eps", "weight_decay", "max_grad_norm")


class SharpnessAwareStep(torch.optim.Optimizer):
    """The Trainer's optimizer: ``step()`` is one whole sharpness-aware update.

    To the Trainer, accelerate and the LR scheduler this is an ordinary optimizer whose
    ``param_groups``, ``state``, ``state_dict`` and ``load_state_dict`` are those of the wrapped
    flatlm optimizer: the schedule drives its learning rate and checkpoints hold its AdamW
    moments. ``step`` calls ``update``, which owns the stashed micro-batches of the update.
    """

    def __init__(self, optimizer: SharpnessAwareOptimizer, update: Callable[[], None]):
        # No Optimizer.__init__ on purpose: like accelerate's AcceleratedOptimizer this is a view
        # of another optimizer, with no groups or state of its own to keep in sync.
        self.optimizer = optimizer
        self._update = update

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        # The flatlm optimizer and its base share one list; keep it that way.
        self.optimizer.param_groups = groups
        self.optimizer.base_optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Run the second passes of the stashed micro-batches and the update."""
        if closure is not None:
            raise TypeError(
                "SharpnessAwareStep.step takes no closure: the Trainer stashes the passes"
            )
        self._update()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


@dataclass
class _MicroBatch:
    """What the second pass needs to replay one micro-batch of the clean pass exactly."""

    model: nn.Module
    inputs: Any
    num_items_in_batch: Tensor | int | None
    record: passes.Recorded  # the RNG state before the clean forward, and r (functional)


class SharpnessAwareTrainerMixin:
    """Makes a ``transformers.Trainer`` (or a subclass of it) train with a flatlm method.

    Put it first: ``class MyTrainer(SharpnessAwareTrainerMixin, SomeTrainer)``.

    Args:
        sam_method: ``sam``, ``fsam``, ``psam``, ``pfsam``, ``gasam`` (with options, e.g.
            ``"gasam:alpha=0.5"``), or ``adamw`` for the unchanged Trainer.
        sam_rho: the radius ρ (None: the method's default).
        sam_kwargs: further options of the method (``alpha``, ``adaptive``, ``fused`` …).
            Learning rate, betas, eps, weight decay and ``max_grad_norm`` come from the
            ``TrainingArguments``.

    ``TrainingArguments.max_grad_norm`` is moved into the flatlm optimizer, which clips the
    gradient AdamW steps with (the perturbed one). The Trainer would clip the clean gradient
    before ``optimizer.step()``, so ``self.args`` becomes a copy with ``max_grad_norm = 0``; the
    value is in ``self.sam_max_grad_norm``. The logged ``grad_norm`` is then the norm of the
    perturbed gradient before clipping (``clean_grad_norm``: the clean one, where the Trainer
    reports it).

    Runs on one device, under DDP, or under Accelerate's FSDP2 (``TrainingArguments(fsdp=True,
    fsdp_config={"version": 2})``); DeepSpeed and FSDP1 are refused (docs/hf.md, "Sharded
    training").
    """

    # Set by Trainer.__init__; declared for type checkers.
    args: Any
    accelerator: Any
    optimizer: Any
    model: nn.Module
    state: Any

    def __init__(
        self,
        *args: Any,
        sam_method: str = "fsam",
        sam_rho: float | None = None,
        sam_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        key, options = parse_method(sam_method)  # an unknown name fails before any work
        super().__init__(*args, **kwargs)
        self.sam_method = sam_method
        self.sam_rho = sam_rho
        self.sam_kwargs = dict(sam_kwargs or {})
        self.sam_max_grad_norm: float | None = None
        self._sam_enabled = key != "adamw"
        self._sam_optimizer: SharpnessAwareOptimizer | None = None
        self._sam_step: SharpnessAwareStep | None = None
        self._sam_stash: list[_MicroBatch] = []
        self._sam_stash_step: int | None = None
        self._sam_grad_norm: Tensor | None = None
        self._sam_devices: list[int] | None = None
        if not self._sam_enabled:
            if sam_rho is not None or self.sam_kwargs:
                raise ValueError("sam_method='adamw' takes no sam_rho or sam_kwargs")
            return
        self._check_supported(options)
        max_norm = self.args.max_grad_norm
        self.sam_max_grad_norm = float(max_norm) if max_norm is not None and max_norm > 0 else None
        self.args = copy.copy(self.args)  # never change the caller's arguments object
        self.args.max_grad_norm = 0.0

    def _check_supported(self, options: dict[str, Any]) -> None:
        name = type(self).__name__
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None):
            raise ValueError(
                f"{name} builds the {self.sam_method} optimizer itself; to train with your own "
                "optimizer pass sam_method='adamw'"
            )
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim not in _ADAMW_OPTIMS:
            raise ValueError(
                f"the flatlm methods wrap torch AdamW; TrainingArguments(optim={optim!r}) asks for "
                f"another optimizer (use one of {', '.join(_ADAMW_OPTIMS)})"
            )
        clashing = sorted(set(self.sam_kwargs) & set(_FROM_ARGS))
        if clashing:
            raise ValueError(
                f"sam_kwargs {clashing} come from TrainingArguments (learning_rate, adam_beta1/2, "
                "adam_epsilon, weight_decay, max_grad_norm); set them there"
            )
        check_options(self.sam_method, self.sam_kwargs, where="in sam_kwargs")
        merged = {**self.sam_kwargs, **options}
        if not method_info(self.sam_method).clean_backward:
            raise ValueError(
                f"{self.sam_method} perturbs along the momentum before the step's only forward and "
                "backward, but the Trainer runs its forward and backward at the clean point "
                "before the optimizer sees the step. Use flatlm's step(forward=, loss_fn=) loop "
                "or flatlm.integrations.accelerate.AcceleratedStep for it (docs/hf.md)"
            )
        if int(merged.get("perturb_every", 1)) > 1 or merged.get("policy") == "reuse_direction":
            raise ValueError(
                "perturb_every > 1 skips the clean backward, which the Trainer has already run "
                "when the optimizer steps; use flatlm's step(forward=, loss_fn=) loop for it"
            )
        if int(merged.get("ascent_steps", 1)) > 1:
            raise ValueError(
                "ascent_steps > 1 needs the whole step in one call; the Trainer integration "
                "runs a single ascent step"
            )
        refusal = self._sharding_refusal()
        if refusal is not None:
            raise ValueError(f"{name} supports single-device, DDP and FSDP2 training: {refusal}")

    def _sharding_refusal(self) -> str | None:
        """Why this Trainer's sharded setup cannot run a sharpness-aware step (None: it can).

        FSDP2 (``fully_shard``, Accelerate's ``fsdp_version=2``) can: its parameters are DTensors,
        the flatlm optimizer perturbs each rank's shard and sums its norms over the shards, and
        ``accelerator.no_sync`` defers FSDP2's reduce-scatter in the replay as in the clean pass.
        """
        fsdp2 = "fsdp_config={'version': 2}"  # TrainingArguments' spelling
        if getattr(self, "is_deepspeed_enabled", False):
            return (
                "under DeepSpeed, accelerate's backward of the last micro-batch already runs "
                "DeepSpeed's engine.step() (clip, optimizer step, zero_grad) and optimizer.step() "
                "is a no-op, so there is no point between the clean gradient and the update for "
                f"the second pass; use FSDP2 instead (TrainingArguments(fsdp=True, {fsdp2}))"
            )
        if getattr(self, "is_distributed_loading_by_transformers", False):
            return (
                "a model sharded at load time (from_pretrained(..., distributed_config=...)) "
                "defers its gradient reduction through the Trainer's own context, not "
                "accelerator.no_sync, and may hold tensor-parallel parameters; this is not "
                f"supported: load the model whole and shard it with TrainingArguments(fsdp=True, {fsdp2})"
            )
        if not getattr(self, "is_fsdp_enabled", False):
            return None
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if getattr(plugin, "fsdp_version", 1) != 2:
            return (
                "FSDP1 (FullyShardedDataParallel) flattens each wrapped module's parameters into "
                "one FlatParameter sharded across ranks, so a rank holds slices of flattened "
                "tensors that flatlm cannot perturb or take norms of tensor by tensor; use FSDP2 "
                f"(TrainingArguments(fsdp=True, {fsdp2}))"
            )
        if getattr(self.args, "fp16", False):
            return (
                "fp16 loss scaling is not supported with FSDP2 (each rank would check only its "
                "own shard of the perturbed gradient for overflow); train in bf16 (bf16=True)"
            )
        return None

    # --- the optimizer ------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The flatlm method over the Trainer's groups (weight decay split as the Trainer does)."""
        if not self._sam_enabled:
            return super().create_optimizer() if model is None else super().create_optimizer(model)  # type: ignore[misc]
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))  # type: ignore[attr-defined]
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [
                {
                    "params": [p for n, p in named if n in decay],
                    "weight_decay": self.args.weight_decay,
                },
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            kwargs: dict[str, Any] = {
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
                "weight_decay": self.args.weight_decay,
                "rho": self.sam_rho,
                "max_grad_norm": self.sam_max_grad_norm,
            }
            optim = str(getattr(self.args.optim, "value", self.args.optim))
            own_base = method_info(self.sam_method).base is not torch.optim.AdamW
            if own_base:  # bsam's BSAMBase: no eps (it divides by s ≥ γ), nothing fused
                del kwargs["eps"]
            elif optim == "adamw_torch_fused" and not {"fused", "foreach"} & set(self.sam_kwargs):
                kwargs["fused"] = True  # what the Trainer itself would build
            kwargs.update(self.sam_kwargs)
            sam = create(self.sam_method, groups, **kwargs)
            assert isinstance(sam, SharpnessAwareOptimizer)
            sam.record_perturbation_norm = True  # logged with the loss
            self._sam_optimizer = sam
            self._sam_step = SharpnessAwareStep(sam, self._sharpness_aware_update)
            self.optimizer = self._sam_step
        return self.optimizer

    @property
    def sam_optimizer(self) -> SharpnessAwareOptimizer | None:
        """The flatlm optimizer (None before training starts, or with ``adamw``)."""
        return self._sam_optimizer

    # --- the clean pass -----------------------------------------------------------------------

    def _trainer_step(
        self, model: nn.Module, inputs: Any, num_items_in_batch: Tensor | int | None
    ) -> Tensor:
        if num_items_in_batch is None:
            return super().training_step(model, inputs)  # type: ignore[misc]
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def training_step(
        self, model: nn.Module, inputs: Any, num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The Trainer's step (clean pass), plus the stash the second pass replays."""
        if not self._sam_enabled:
            return self._trainer_step(model, inputs, num_items_in_batch)
        sam = self._sam_optimizer
        if sam is None:
            raise RuntimeError("training_step before create_optimizer(): use trainer.train()")
        if self._sam_stash_step != self.state.global_step:
            # A new update. A leftover stash means the last one never reached our step (GradScaler
            # skipped it for an overflow in the clean pass): drop it.
            if self._sam_stash and sam.noisy_pass:
                sam.abort_step()  # bSAM's θ + e of the update that never stepped: θ back
            self._sam_stash = []
            self._sam_stash_step = self.state.global_step
        if sam.noisy_pass:  # bSAM: this update's clean passes at θ + e (one draw for all of them)
            sam.add_noise()
        rng = passes.RngState(self._cuda_devices(model))
        capture = passes.LogitsCapture(model, want_grad=True) if sam.functional else None
        try:
            loss = self._trainer_step(model, inputs, num_items_in_batch)
        finally:
            if capture is not None:
                capture.close()
        dlogits = None
        if capture is not None:
            if capture.dlogits is None:
                raise RuntimeError(
                    f"{self.sam_method}: the loss did not reach the model's logits, so their "
                    "gradient (dlogits) is unknown; the functional methods need loss = ℓ(logits)"
                )
            dlogits = capture.dlogits
        record = passes.Recorded(rng, dlogits)
        self._sam_stash.append(_MicroBatch(model, inputs, num_items_in_batch, record))
        return loss

    # --- the update ---------------------------------------------------------------------------

    def _sharpness_aware_update(self) -> None:
        """first_step, the stashed micro-batches again at θ+ε, second_step."""
        stash, self._sam_stash = self._sam_stash, []
        sam = self._sam_optimizer
        assert sam is not None
        if not stash:
            # torch.distributed.checkpoint (accelerate's FSDP2 checkpoints) creates a fresh
            # optimizer's state by step() with zero gradients and lr 0; the flatlm optimizer
            # recognises exactly that call. Any other step() without a clean pass is an error.
            try:
                sam.step()
            except TypeError:
                pass
            else:
                return
            raise RuntimeError(
                "optimizer.step() without a clean pass: the sharpness-aware step replays the "
                "micro-batches training_step stashed"
            )
        model = stash[-1].model
        end = passes.RngState(self._cuda_devices(model))

        def run(i: int, record: passes.Recorded) -> None:
            mb = stash[i]
            if record.dlogits is None:
                self._trainer_step(mb.model, mb.inputs, mb.num_items_in_batch)
            else:
                self._functional_pass(mb, record.dlogits)

        # False: the step policy (or ρ = 0) makes this step plain or a LookSAM reuse: the clean
        # gradient, already unscaled by GradScaler.step, is the one; no second pass.
        perturbed = sam.first_step(functional_vjp=sam.functional)
        if perturbed:
            sam.zero_grad(set_to_none=True)
            try:
                # Same inputs and RNG as the clean pass; DDP all-reduces once, with the last one.
                passes.replay(
                    [mb.record for mb in stash], run, partial(self.accelerator.no_sync, model)
                )
            except BaseException:
                sam.abort_step()  # θ must not stay perturbed
                raise
            finally:
                # The generators end where the clean pass left them, as if there were one pass
                # (replay alone ends there only if a forward's draws do not depend on θ).
                end.restore()

        overflow = self._unscale_perturbed() if perturbed else False
        params = [p for g in sam.param_groups for p in g["params"] if p.grad is not None]
        # FSDP2: this rank's shards, their squares summed over the shard group (a plain tensor).
        with sharded.reducing(sam.sharding):
            grads = [sharded.local(p.grad) for p in params]  # type: ignore[arg-type]
            self._sam_grad_norm = global_norm(grads).detach()
        if overflow:
            with warnings.catch_warnings():  # routine while GradScaler finds its scale
                warnings.simplefilter("ignore", NonFiniteStepWarning)
                sam.second_step()  # non-finite gradient: θ restored, the step skipped
        else:
            sam.second_step()

    def _functional_pass(self, mb: _MicroBatch, dlogits: Tensor) -> None:
        """J(θ+ε)ᵀ r: the clean pass's forward again, and the logits' VJP with the stored r."""
        model = mb.model
        capture = passes.LogitsCapture(model, want_grad=False)
        try:
            model.train()
            inputs = self._prepare_inputs(mb.inputs)  # type: ignore[attr-defined]
            kwargs = {}
            if mb.num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = mb.num_items_in_batch
            with self.compute_loss_context_manager():  # type: ignore[attr-defined]
                self.compute_loss(model, inputs, **kwargs)  # type: ignore[attr-defined]
        finally:
            capture.close()
        assert capture.logits is not None
        # r carries every factor of the clean backward (accumulation, loss normalisation, scaler).
        passes.vjp(capture.logits, dlogits)

    def _unscale_perturbed(self) -> bool:
        """fp16: unscale the perturbed gradients; on overflow make GradScaler back off.

        GradScaler.step already unscaled the clean gradients (and skipped the whole update if
        they overflowed); ``scaler.unscale_`` cannot run twice per update, so the second pass is
        unscaled here with the same kernel and scale. An overflow is recorded in the scaler's
        found-inf flags for this optimizer, so its ``update()`` backs off, and reported to
        accelerate as a skipped step, so the LR scheduler does not advance.
        """
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return False
        sam = self._sam_optimizer
        assert sam is not None
        grads = [p.grad for g in sam.param_groups for p in g["params"] if p.grad is not None]
        if not bool(amp.unscale_grads_(grads, amp.inverse_scale(scaler)).item()):
            return False
        state = scaler._per_optimizer_states.get(id(self._sam_step))
        if state is not None:
            for flag in state["found_inf_per_device"].values():
                flag.fill_(1.0)
        if getattr(self.optimizer, "optimizer", None) is self._sam_step and hasattr(
            self.optimizer, "_accelerate_step_called"
        ):
            self.optimizer._accelerate_step_called = False
        return True

    def _cuda_devices(self, model: nn.Module) -> list[int]:
        if self._sam_devices is None:
            self._sam_devices = passes.cuda_devices(list(model.parameters()))
        return self._sam_devices

    # --- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The training logs' ``grad_norm`` is the perturbed gradient's (before clipping); they
        also carry ``perturbation_norm`` (‖ε‖ of the last step) and ``skipped_steps`` (steps
        skipped for a non-finite loss or gradient, fp16 overflows included)."""
        if self._sam_enabled and self._sam_grad_norm is not None and "loss" in logs:
            if "grad_norm" in logs:
                logs["clean_grad_norm"] = logs["grad_norm"]
            logs["grad_norm"] = float(self._sam_grad_norm)
            sam = self._sam_optimizer
            assert sam is not None
            if sam.perturbation_norm is not None:
                logs["perturbation_norm"] = float(sam.perturbation_norm)
            logs["skipped_steps"] = sam.skipped_steps
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class SharpnessAwareTrainer(SharpnessAwareTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``sam_method=``, ``sam_rho=``, ``sam_kwargs=``.

    See :class:`SharpnessAwareTrainerMixin`; ``sam_method="adamw"`` is the plain Trainer.
    """
