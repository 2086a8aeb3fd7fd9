"""FSDP2 (fully_shard) with 2 gloo processes on CPU: each rank perturbs, restores and steps its
own shard, and the run equals one unsharded process on the global batch.

TinyMLP's layers have 7 and 4 rows, so rank 0 holds 4 of fc1's 7 rows and rank 1 three: the
shards are uneven, as FSDP2's are in general.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flatlm.optim import create, gradient_sync
from flatlm.optim.sharded import Sharding
from helpers.distributed import global_batches, spawn
from helpers.fsdp import CHECKPOINTED, Spec, checkpoint_worker, dcp_load, dcp_save, worker
from helpers.optim import SAM_METHODS, make_mlp

pytestmark = [
    pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend"),
    # DCP in the test process itself (the one-process side of the checkpoint tests)
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

EVERY_METHOD = [Spec(name) for name in SAM_METHODS]
ACCUMULATION = [Spec(name, micro=2) for name in ("sam", "fsam", "pfsam", "gasam", "msam")]
PERTURB_EVERY = [Spec(name, {"perturb_every": 2}) for name in ("sam", "fsam", "psam", "gasam")]
OPTIONS = [
    Spec("sam", {"max_grad_norm": 0.05}),
    Spec("sam", {"max_grad_norm": 1e3}),  # far above ‖g‖: clipping must leave g alone
    Spec("gasam", {"ascent_steps": 2}),
    Spec("asam", {"eta": 0.1}),
]
# Step policies: LookSAM's g_v (inner products over shards, stored sharded), AE-SAM's ‖g‖² over
# shards (every rank decides alike), RST's draws, and ρ = 0's plain step (its clipping sharded).
POLICIES = [
    Spec("sam", {"policy": "looksam", "every": 2}),
    Spec("fsam", {"policy": "looksam", "every": 2}, micro=2),
    Spec("sam", {"policy": "aesam", "aesam_c_start": 0.0, "aesam_c_end": 0.0}),
    Spec("sam", {"policy": "rst", "rst_p": 0.5, "policy_seed": 1}),
    Spec("gasam", {"rho": 0.0, "max_grad_norm": 0.05}),
]
EQUAL = EVERY_METHOD + ACCUMULATION + PERTURB_EVERY + OPTIONS + POLICIES
POISONED = [
    Spec("sam", poison_step=1),
    Spec("gasam", poison_step=1),
    Spec("sam", poison_step=1, poison="loss"),
    Spec("fsam", poison_step=1, poison="loss"),
]
# rho = 1e-300 with dropout: θ + ε = θ bit for bit (ε is far below θ's last bit; ρ = 0 would
# make the step plain, one pass), so the perturbed pass equals the clean one only if its dropout
# masks are replayed, and the step then equals AdamW's with the same masks.
DROPOUT = [
    Spec("sam", {"rho": 1e-300}, dropout=0.5),
    Spec("sam", {"rho": 1e-300, "replay_rng": False}, dropout=0.5),
    Spec("adamw", dropout=0.5),
]
BF16 = [
    Spec("sam", bf16=True),
    Spec("fsam", bf16=True),
    Spec("sam", autocast=True),
    Spec("gasam", autocast=True),
]
SPECS = EQUAL + POISONED + DROPOUT + BF16


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(worker, 2, str(out), SPECS)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def unsharded(spec: Spec, batches=None) -> tuple[list[torch.Tensor], object]:
    """The same run in one process, unsharded, on the global batch."""
    model = make_mlp()
    opt = create(spec.name, model.parameters(), **{"rho": 0.2, "lr": 0.01, **spec.kw})
    for x, y in batches or global_batches():
        if spec.micro == 1:
            opt.step(forward=lambda x=x: model(x), loss_fn=lambda z, y=y: F.cross_entropy(z, y))
        else:  # each rank's micro-batches, in an order that makes the same global mean
            opt.step(
                forward=lambda mb: model(mb[0]),
                loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
                micro_batches=list(
                    zip(x.chunk(2 * spec.micro), y.chunk(2 * spec.micro), strict=True)
                ),
            )
    return [p.detach() for p in model.parameters()], opt


@pytest.mark.parametrize("spec", EQUAL, ids=lambda s: s.key)
def test_two_sharded_ranks_equal_one_unsharded_process_on_the_global_batch(sharded, spec):
    expected, _ = unsharded(spec)
    for rank in range(2):
        for got, want in zip(sharded[rank][spec.key]["params"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # float64 model


def test_a_max_grad_norm_above_the_gradient_norm_changes_nothing(sharded):
    # clip_grad_norm_ only ever scales down: with the threshold far above ‖g‖ the sharded run
    # equals one process that does not clip at all (a coefficient not clamped at 1 would scale
    # every gradient up to norm 1000).
    expected, _ = unsharded(Spec("sam"))
    for rank in range(2):
        got = sharded[rank][Spec("sam", {"max_grad_norm": 1e3}).key]["params"]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_runs_moved_theta():
    # Guards the comparison above: three steps move every parameter well beyond its tolerance.
    got, _ = unsharded(Spec("sam"))
    for a, b in zip(got, make_mlp().parameters(), strict=True):
        assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("spec", POISONED, ids=lambda s: s.key)
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(sharded, spec):
    # Rank 1's batch (or only its loss, the gradients staying finite everywhere) is NaN at step
    # 1: the step is skipped on both ranks, θ and the state stay where step 0 left them, and
    # step 2 goes on: the run equals steps 0 and 2 alone.
    x, y = zip(*global_batches(), strict=True)
    expected, _ = unsharded(spec, [(x[0], y[0]), (x[2], y[2])])
    for rank in range(2):
        result = sharded[rank][spec.key]
        assert result["skipped"] == 1
        assert torch.isnan(torch.tensor(result["losses"][1])) == (rank == 1)
        for got, want in zip(result["params"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_perturbed_pass_replays_each_ranks_dropout_masks(sharded):
    for rank in range(2):
        replayed = sharded[rank][DROPOUT[0].key]["params"]
        unreplayed = sharded[rank][DROPOUT[1].key]["params"]
        adamw = sharded[rank][DROPOUT[2].key]["params"]
        assert all(torch.equal(a, b) for a, b in zip(replayed, adamw, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(unreplayed, adamw, strict=True))


@pytest.mark.parametrize("spec", BF16, ids=lambda s: s.key)
def test_bf16_mixed_precision_matches_one_rank(sharded, spec):
    # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), or torch.autocast(bf16) around
    # the forward: the sharded parameters, their clean copies and the optimizer stay float32;
    # the forward runs in bf16. Reference: FSDP2 on
    # a mesh of one rank with the same policy on the global batch (so the same bf16 rounding of
    # the weights), which differs only in how the batch's gradient is summed.
    result, reference = sharded[0][spec.key], sharded[0][f"{spec.key}/one rank"]
    assert set(result["local_dtypes"]) == {"torch.float32"}
    for got, want in zip(result["params"], reference["params"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_the_extra_copy_is_sharded_too(sharded):
    # Per rank, the clean copy (and GA-SAM's EMA, perturb_every's direction) holds that rank's
    # rows only: the ranks together hold exactly what one process does.
    # GA-SAM's step counts are scalars on every rank, not sharded: the only bytes held twice.
    for spec in (Spec("sam"), Spec("gasam"), Spec("sam", {"perturb_every": 2})):
        _, opt = unsharded(spec)
        scalars = sum(
            t.numel() * t.element_size()
            for st in opt.state.values()
            for t in st.values()
            if t.dim() == 0
        )
        per_rank = [sharded[r][spec.key]["extra_bytes"] for r in range(2)]
        assert sum(per_rank) == opt.extra_bytes() + scalars
        assert max(per_rank) <= 0.6 * opt.extra_bytes()  # 4 of fc1's 7 rows on rank 0


@pytest.mark.parametrize("check", ["sam/lr0", "fsam/lr0", "gasam/lr0"])
def test_theta_is_restored_bit_for_bit_on_every_shard(sharded, check):
    # With lr = 0 the base optimizer leaves θ as it finds it, so θ after three steps is θ before
    # them exactly only if every shard was restored exactly from its perturbed point.
    assert all(sharded[r]["restore"][check] for r in range(2))


@pytest.mark.parametrize("name", ["sam", "fsam", "gasam"])
def test_a_pass_that_raises_leaves_every_shard_and_the_state_as_they_were(sharded, name):
    assert all(sharded[r]["restore"][f"{name}/raised"] for r in range(2))


def test_unsharded_parameters_need_no_process_group():
    assert not Sharding.of(list(make_mlp().parameters())).active


def test_gradient_sync_needs_an_fsdp2_module():
    with pytest.raises(TypeError, match="not an FSDP2 module"):
        gradient_sync(make_mlp())


# --- checkpoints: saved on N ranks, loaded on M -------------------------------------------------


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """One unsharded process saves after two steps; 2 sharded ranks save after theirs and resume
    from the unsharded checkpoint; the unsharded process then resumes from the sharded one."""
    folder = str(tmp_path_factory.mktemp("dcp"))
    saved_on_1 = {name: _save_unsharded(name, kw, folder) for name, kw in CHECKPOINTED}
    spawn(checkpoint_worker, 2, folder)
    on_two = [torch.load(f"{folder}/rank{r}.pt", weights_only=False) for r in range(2)]
    resumed_on_1 = {}
    for name, kw in CHECKPOINTED:
        model = make_mlp()
        opt = create(name, model.parameters(), rho=0.2, lr=0.01, **kw)
        dcp_load(model, opt, f"{folder}/{name}/saved_on_2")
        x, y = global_batches()[2]
        opt.step(forward=lambda: model(x), loss_fn=lambda z: F.cross_entropy(z, y))
        resumed_on_1[name] = [p.detach() for p in model.parameters()]
    return saved_on_1, on_two, resumed_on_1


def _save_unsharded(name, kw, folder):
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.2, lr=0.01, **kw)
    batches = global_batches()
    for x, y in batches[:2]:
        opt.step(forward=lambda x=x: model(x), loss_fn=lambda z, y=y: F.cross_entropy(z, y))
    dcp_save(model, opt, f"{folder}/{name}/saved_on_1")
    x, y = batches[2]
    opt.step(forward=lambda: model(x), loss_fn=lambda z: F.cross_entropy(z, y))
    return [p.detach() for p in model.parameters()]


def _assert_params_equal(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [name for name, _ in CHECKPOINTED])
def test_saved_on_two_ranks_loads_on_one_and_continues_identically(resharded, name):
    _, on_two, resumed_on_1 = resharded
    _assert_params_equal(resumed_on_1[name], on_two[0][name]["went on"])


@pytest.mark.parametrize("name", [name for name, _ in CHECKPOINTED])
def test_saved_on_one_loads_on_two_ranks_and_continues_identically(resharded, name):
    saved_on_1, on_two, _ = resharded
    for rank in range(2):
        _assert_params_equal(on_two[rank][name]["resumed"], saved_on_1[name])
