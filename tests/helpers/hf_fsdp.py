"""SharpnessAwareTrainer runs for the 2-process gloo FSDP2 tests (importable by spawned processes).

Every run trains a tiny float64 GPT-2 through the Hugging Face Trainer on the same data in the
same order (a sequential sampler). On 2 ranks each micro-batch of 2 per rank is half of the
unsharded run's micro-batch of 4, so both see the same global batch at every update.

Accelerate enables FSDP only on accelerator devices: ``AcceleratorState.__init__``
(accelerate/state.py, 1.15) turns ``DistributedType.MULTI_GPU`` and its siblings into
``DistributedType.FSDP`` when an FSDP plugin is given, never ``MULTI_CPU``, so on CPU the
Trainer's ``fsdp`` arguments are dropped and it trains with DDP. :func:`cpu_fsdp` makes a spawned
process take the FSDP path on CPU (gloo): after ``AcceleratorState.__init__`` a ``MULTI_CPU``
state given a plugin becomes ``FSDP`` with that plugin. Nothing else is changed: Accelerate's
own FSDP2 ``prepare`` (``fully_shard``, the optimizer's parameters swapped for the DTensors), its
``no_sync``, the Trainer's loop and checkpoints.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import TrainerCallback, TrainingArguments

from flatlm.integrations.hf import SharpnessAwareTrainer
from flatlm.optim import NonFiniteStepWarning
from helpers.hf_models import lm_data, tiny_gpt2

STEPS = 3
PER_RANK_BATCH = 2
# SHARDED_STATE_DICT: checkpoints through torch.distributed.checkpoint. (The Trainer's default,
# FULL_STATE_DICT, aborts in gloo inside torch's get_model_state_dict on CPU, for the plain
# Trainer too: a limit of this CPU stand-in, not looked into further.)
FSDP_CONFIG = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}


@dataclass(frozen=True)
class Run:
    """One Trainer run: ``sam_method=method``, ``gradient_accumulation_steps=accumulation``."""

    method: str
    accumulation: int = 2
    poison_step: int | None = None  # the loss is NaN at this update (on the last rank only)
    stop_after: int | None = None  # save a checkpoint at this step and stop there
    resume_from: int | None = None  # continue from the checkpoint saved at this step

    @property
    def key(self) -> str:
        return (
            f"{self.method}/ga={self.accumulation}/poison={self.poison_step}"
            f"/stop={self.stop_after}/resume={self.resume_from}"
        )

    @property
    def output_dir(self) -> str:
        """Shared by a run that stops at a checkpoint and the run that resumes from it."""
        return f"{self.method}-ga{self.accumulation}-poison{self.poison_step}"


def cpu_fsdp() -> None:
    """Let Accelerate take its FSDP path on CPU in this process (see the module docstring)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What the MULTI_GPU branch of AcceleratorState.__init__ does with the plugin.
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init  # type: ignore[method-assign]


class InOrder(SharpnessAwareTrainer):
    """The data in order, so a run on 2 ranks and one on 1 see the same global batches."""

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.data.SequentialSampler(self.train_dataset)


class StopAt(TrainerCallback):
    """Stops training after global step ``step`` (its checkpoint saved), as a crash would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def full(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter whole (an all-gather for DTensors), detached."""
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def train(run: Run, out: str, world: int = 1, rank: int = 0, fsdp: dict | None = None) -> dict:
    """``run`` through the Trainer: on ``world`` ranks with FSDP2 when ``fsdp`` (the
    ``fsdp_config``) is given, else in this process alone on the global batch."""
    trainer: InOrder | None = None

    def loss(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
        """test_hf.py's float64 loss (summed, divided by the update's token count); NaN on
        the last rank at update ``run.poison_step``."""
        logits, labels = outputs["logits"][:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        value = F.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch
        assert trainer is not None
        if trainer.state.global_step == run.poison_step and rank == world - 1:
            value = value * float("nan")
        return value

    output_dir = os.path.join(out, run.output_dir)
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "use_cpu": True,
        "report_to": [],
        "per_device_train_batch_size": PER_RANK_BATCH * 2 // world,
        "gradient_accumulation_steps": run.accumulation,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "lr_scheduler_type": "linear",
        "max_steps": STEPS,
        "max_grad_norm": 0.5,  # the perturbed gradients here have norms 0.6-1.4: clipped
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
        "disable_tqdm": True,
    }
    if run.stop_after is not None:
        kwargs.update(save_strategy="steps", save_steps=run.stop_after)
    if fsdp is not None:
        kwargs.update(fsdp=True, fsdp_config=dict(fsdp))
    trainer = InOrder(
        model=tiny_gpt2().double(),
        args=TrainingArguments(**kwargs),
        train_dataset=lm_data(PER_RANK_BATCH * 2 * run.accumulation * STEPS),
        sam_method=run.method,
        sam_rho=0.2,
        compute_loss_func=loss,
        callbacks=[StopAt(run.stop_after)] if run.stop_after else None,
    )
    resume = None if run.resume_from is None else f"{output_dir}/checkpoint-{run.resume_from}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteStepWarning)  # the poisoned update's
        trainer.train(resume_from_checkpoint=resume)
    sam = trainer.sam_optimizer
    assert sam is not None
    logged = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    return {
        "params": full(trainer.model),
        "dtensors": all(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
        "placements": {
            (str(p.placements), p.device_mesh.size())  # type: ignore[attr-defined]
            for p in trainer.model.parameters()
            if hasattr(p, "placements")
        },
        "global_step": trainer.state.global_step,
        "skipped": sam.skipped_steps,
        "grad_norms": [float(e["grad_norm"]) for e in logged],
        "perturbation_norms": [float(e["perturbation_norm"]) for e in logged],
    }


def worker(rank: int, world: int, port: int, out: str, runs: list[Run]) -> None:
    """Each run on ``world`` gloo ranks with Accelerate's FSDP2; results to ``out/rank{r}.pt``."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    cpu_fsdp()
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        results = {run.key: train(run, out, world, rank, FSDP_CONFIG) for run in runs}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
