"""SharpnessAwareTrainer under Accelerate's FSDP2 (``TrainingArguments(fsdp=True,
fsdp_config={"version": 2})``) with 2 gloo processes on CPU: the sharded Trainer run equals the
same Trainer run unsharded in one process on the global batch; the setups that cannot run a
sharpness-aware step (DeepSpeed, FSDP1, FSDP2 with fp16) are refused with the reason.

Accelerate does not enable FSDP on CPU, so the spawned processes switch its state to FSDP by
hand (tests/helpers/hf_fsdp.py, ``cpu_fsdp``); everything after that is Accelerate's and the
Trainer's own code. NCCL on GPUs is not run here.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers
from accelerate.utils import FullyShardedDataParallelPlugin

from flatlm.integrations.hf import SharpnessAwareTrainer
from helpers.distributed import spawn
from helpers.hf_fsdp import STEPS, Run, train, worker
from helpers.hf_models import tiny_gpt2

transformers.logging.set_verbosity_error()

FSDP2_PLUGIN = "fsdp_version" in {
    f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)
}
needs_fsdp2 = pytest.mark.skipif(
    not (dist.is_gloo_available() and FSDP2_PLUGIN),
    reason="needs the gloo backend and an accelerate with FSDP2",
)

EQUAL = [
    Run("sam"),
    Run("fsam"),
    Run("pfsam"),
    Run("gasam"),
    Run("sam", accumulation=1),
    Run("gasam", poison_step=1),  # one rank's loss is NaN: every rank skips that update
]
CHECKPOINT = [Run("gasam", stop_after=1), Run("gasam", resume_from=1)]
# float64 throughout: measured ≤ 4e-14 apart (test_hf.py's tolerance for its float64 loops)
TOL = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_fsdp")
    spawn(worker, 2, str(out), EQUAL + CHECKPOINT)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@needs_fsdp2
@pytest.mark.parametrize("run", EQUAL, ids=lambda r: r.key)
def test_two_fsdp2_ranks_equal_one_unsharded_trainer_on_the_global_batch(sharded, tmp_path, run):
    """Clipping at max_grad_norm 0.5 acts at every update; the logged (perturbed, pre-clip)
    gradient norm and ‖ε‖ are those of the unsharded run."""
    want = train(run, str(tmp_path))
    assert not want["dtensors"]
    for rank in range(2):
        got = sharded[rank][run.key]
        assert got["dtensors"]  # FSDP2 ran: every parameter a DTensor, sharded over 2 ranks
        assert got["placements"] == {("(Shard(dim=0),)", 2)}
        assert got["global_step"] == want["global_step"] == STEPS
        assert got["skipped"] == want["skipped"] == (0 if run.poison_step is None else 1)
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, **TOL, msg=name)
        torch.testing.assert_close(got["grad_norms"], want["grad_norms"], **TOL, equal_nan=True)
        torch.testing.assert_close(
            got["perturbation_norms"], want["perturbation_norms"], **TOL, equal_nan=True
        )
    for name in want["params"]:  # the ranks agree exactly
        assert torch.equal(sharded[0][run.key]["params"][name], sharded[1][run.key]["params"][name])
    # Guards: clipping acted, and the run moved θ far beyond the tolerance.
    if run.poison_step is None:
        assert min(want["grad_norms"]) > 0.5
    initial = {n: p.detach() for n, p in tiny_gpt2().double().named_parameters()}
    assert max(float((v - initial[n]).abs().max()) for n, v in want["params"].items()) > 1e-3


@pytest.mark.slow
@needs_fsdp2
def test_fsdp2_checkpoint_resumes_identically(sharded):
    """Saved at step 1 through torch.distributed.checkpoint (which first calls step() with
    zero gradients and lr 0 to create the optimizer state), resumed to step 3: the same
    parameters as the uninterrupted run, bit for bit, GA-SAM's gradient statistics included."""
    for rank in range(2):
        stopped = sharded[rank][CHECKPOINT[0].key]
        resumed = sharded[rank][CHECKPOINT[1].key]
        full = sharded[rank][Run("gasam").key]
        assert stopped["global_step"] == 1 and resumed["global_step"] == STEPS
        for name, value in full["params"].items():
            assert torch.equal(resumed["params"][name], value), name


# --- what is refused, and why ------------------------------------------------------------------


def bare_trainer(**attributes) -> SharpnessAwareTrainer:
    """A SharpnessAwareTrainer with only what ``_check_supported`` reads (DeepSpeed and FSDP1
    cannot be set up on a CPU: accelerate needs an accelerator device for both)."""
    trainer = object.__new__(SharpnessAwareTrainer)
    vars(trainer).update(
        args=SimpleNamespace(optim="adamw_torch", fp16=False),
        optimizer=None,
        sam_method="sam",
        sam_kwargs={},
        is_deepspeed_enabled=False,
        is_fsdp_enabled=False,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None)),
    )
    vars(trainer).update(attributes)
    return trainer


def fsdp(version: int) -> dict:
    plugin = SimpleNamespace(fsdp_version=version)
    return {
        "is_fsdp_enabled": True,
        "accelerator": SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    }


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        ({"is_deepspeed_enabled": True}, ["DeepSpeed", "engine.step()", "version': 2"]),
        (fsdp(1), ["FSDP1", "FlatParameter", "version': 2"]),
        (
            {**fsdp(2), "args": SimpleNamespace(optim="adamw_torch", fp16=True)},
            ["fp16", "FSDP2", "bf16=True"],
        ),
        ({"is_distributed_loading_by_transformers": True}, ["distributed_config", "version': 2"]),
    ],
    ids=["deepspeed", "fsdp1", "fsdp2-fp16", "sharded-at-load"],
)
def test_sharded_setups_that_cannot_work_are_refused_with_the_reason(attributes, words):
    with pytest.raises(ValueError, match="supports single-device, DDP and FSDP2") as info:
        bare_trainer(**attributes)._check_supported({})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("attributes", [{}, fsdp(2)], ids=["one-device-or-ddp", "fsdp2"])
def test_fsdp2_and_unsharded_setups_pass_the_check(attributes):
    bare_trainer(**attributes)._check_supported({})
