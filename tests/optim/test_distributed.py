"""DDP with 2 gloo processes on CPU: sync mode equals one process on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call, grad

from flatlm.optim import create
from helpers.distributed import aborting_worker, ddp_worker, global_batches, spawn
from helpers.optim import SAM_METHODS, make_mlp

# Step policies: every rank takes the same decisions (AE-SAM from the all-reduced ‖g‖², RST from
# its seed) and LookSAM's g_v from the all-reduced gradients.
POLICY_SPECS = [
    ("sam:policy=looksam,every=2", "sync", 1),
    ("fsam:policy=aesam,aesam_c_start=0,aesam_c_end=0", "sync", 2),
    ("sam:policy=rst,rst_p=0.5,policy_seed=2", "sync", 1),
]
SPECS = (
    [(m, "sync", 1) for m in SAM_METHODS]
    + [("fsam", "sync", 2)]
    + POLICY_SPECS
    + [("sam", "local", 1)]
)

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(ddp_worker, 2, str(out), SPECS)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _single_process(name: str) -> list[torch.Tensor]:
    model = make_mlp()
    opt = create(name, model.parameters(), rho=0.2, lr=0.01)
    for x, y in global_batches():
        opt.step(forward=lambda x=x: model(x), loss_fn=lambda z, y=y: F.cross_entropy(z, y))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize(("name", "mode", "micro"), SPECS[:-1])
def test_sync_mode_on_two_ranks_equals_one_process_on_the_global_batch(
    ddp_results, name, mode, micro
):
    expected = _single_process(name)
    for rank in range(2):
        got = ddp_results[rank][f"{name}/{mode}/{micro}"]
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_local_mode_perturbs_each_rank_with_its_own_gradient(ddp_results):
    # Reference: ε_r = ρ g_r/‖g_r‖ from rank r's half; descent gradient = mean_r ∇L_r(θ + ε_r).
    model = make_mlp()
    names = [n for n, _ in model.named_parameters()]
    ref_model = make_mlp()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01)
    for x, y in global_batches():
        theta = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        descent = {n: torch.zeros_like(t) for n, t in theta.items()}
        for xs, ys in zip(x.chunk(2), y.chunk(2), strict=True):

            def loss(params, xs=xs, ys=ys):
                return F.cross_entropy(functional_call(model, params, (xs,)), ys)

            g = grad(loss)(theta)
            norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names))
            gt = grad(loss)({n: theta[n] + 0.2 * g[n] / norm for n in names})
            for n in names:
                descent[n] += gt[n] / 2
        for n, p in ref_model.named_parameters():
            p.grad = descent[n]
        ref_opt.step()
    for rank in range(2):
        got = ddp_results[rank]["sam/local/1"]
        for a, b in zip(got, ref_model.parameters(), strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    sync = ddp_results[0]["sam/sync/1"]
    assert any(not torch.allclose(a, b) for a, b in zip(got, sync, strict=True))


def test_local_mode_without_no_sync_is_an_error():
    model = make_mlp()
    opt = create("sam", model.parameters(), lr=0.01, distributed="local")
    with pytest.raises(ValueError, match="no_sync"):
        opt.step(forward=lambda: model(torch.zeros(2, 5, dtype=torch.float64)), loss_fn=torch.sum)
    with pytest.raises(ValueError, match="'sync' or 'local'"):
        create("sam", model.parameters(), lr=0.01, distributed="global")


def test_a_rank_killed_by_a_signal_is_retried_once_then_fails_with_its_standard_error():
    with (
        pytest.warns(UserWarning, match="retrying a spawned process group once: rank 0 died by"),
        pytest.raises(RuntimeError, match=r"(?s)rank 0 died by SIGABRT.*rank 0's standard error"),
    ):
        spawn(aborting_worker, 2)
