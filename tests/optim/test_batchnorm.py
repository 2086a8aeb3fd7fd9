"""flatlm.optim.batchnorm: running statistics moved by the clean pass only, on a small CNN,
against running statistics computed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlm.optim import create
from flatlm.optim.batchnorm import frozen_running_stats, tracking_layers, update_stats_once

MOMENTUM = 0.1


class SmallCNN(nn.Module):
    """conv → BatchNorm2d → ReLU → pool → linear; ``bn`` sees the conv's output."""

    def __init__(self, momentum: float | None = MOMENTUM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=momentum)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


def batch(seed: int = 1, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,))


def hand_running_stats(conv_outputs: list[torch.Tensor], momentum: float | None):
    """BatchNorm's documented update from mean 0, variance 1, one update per tensor:
    r ← (1 − m) r + m s with the batch mean and the unbiased batch variance per channel
    (m = 1/t, the cumulative average, when momentum is None)."""
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for t, h in enumerate(conv_outputs, start=1):
        m = 1.0 / t if momentum is None else momentum
        flat = h.transpose(0, 1).flatten(1)  # channel × (batch · height · width)
        mean = (1 - m) * mean + m * flat.mean(dim=1)
        var = (1 - m) * var + m * flat.var(dim=1, unbiased=True)
    return mean, var, len(conv_outputs)


def stats_of(model: SmallCNN):
    bn = model.bn
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["sam", "fsam", "gasam"])
@pytest.mark.parametrize("momentum", [MOMENTUM, None])
def test_step_with_update_stats_once_leaves_the_clean_pass_statistics(method, momentum):
    model = SmallCNN(momentum).double()
    x, y = batch()
    with torch.no_grad():
        conv_at_theta = model.conv(x)  # before the step: θ
    opt = create(method, model.parameters(), rho=0.5, lr=0.01)
    opt.step(
        forward=update_stats_once(model, lambda: model(x)), loss_fn=lambda z: F.cross_entropy(z, y)
    )
    mean, var, count = hand_running_stats([conv_at_theta], momentum)
    got_mean, got_var, got_count = stats_of(model)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-14)
    assert got_count == count == 1


def test_without_it_the_perturbed_pass_moves_the_statistics_again():
    """The test above can fail: a plain step updates twice, once at θ + ε."""
    model = SmallCNN().double()
    x, y = batch()
    opt = create("sam", model.parameters(), rho=0.5, lr=0.01)
    opt.step(forward=lambda: model(x), loss_fn=lambda z: F.cross_entropy(z, y))
    assert int(model.bn.num_batches_tracked) == 2
    with torch.no_grad():
        conv_at_theta = SmallCNN().double().conv(x)
    mean, _, _ = hand_running_stats([conv_at_theta], MOMENTUM)
    assert (model.bn.running_mean - mean).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_the_step_itself_is_unchanged_and_equals_one_plain_forward(method):
    """Outputs and gradients are bit for bit the unfrozen ones: the same parameters as a plain
    step; the statistics those of one plain training forward at θ."""
    frozen, plain, forward_only = SmallCNN().double(), SmallCNN().double(), SmallCNN().double()
    x, y = batch()
    for model, wrap in [(frozen, True), (plain, False)]:
        opt = create(method, model.parameters(), rho=0.5, lr=0.01)
        for _ in range(3):

            def forward(model=model):
                return model(x)

            opt.step(
                forward=update_stats_once(model, forward) if wrap else forward,
                loss_fn=lambda z: F.cross_entropy(z, y),
            )
    for a, b in zip(params_of(frozen), params_of(plain), strict=True):
        assert torch.equal(a, b)
    # three steps: three updates, each at that step's θ (replayed here from the plain run's θs)
    assert int(frozen.bn.num_batches_tracked) == 3
    assert int(plain.bn.num_batches_tracked) == 6
    forward_only.train()
    with torch.no_grad():
        forward_only(x)
        ref_mean, ref_var, _ = stats_of(forward_only)
    first = SmallCNN().double()
    opt = create(method, first.parameters(), rho=0.5, lr=0.01)
    opt.step(
        forward=update_stats_once(first, lambda: first(x)), loss_fn=lambda z: F.cross_entropy(z, y)
    )
    got_mean, got_var, _ = stats_of(first)
    assert torch.equal(got_mean, ref_mean) and torch.equal(got_var, ref_var)


def test_micro_batches_update_once_each_at_theta():
    model = SmallCNN().double()
    x, y = batch(n=8)
    mbs = list(zip(x.chunk(2), y.chunk(2), strict=True))
    with torch.no_grad():
        convs = [model.conv(mb[0]) for mb in mbs]
    opt = create("fsam", model.parameters(), rho=0.5, lr=0.01)
    opt.step(
        forward=update_stats_once(model, lambda mb: model(mb[0])),
        loss_fn=lambda z, mb: F.cross_entropy(z, mb[1]),
        micro_batches=mbs,
    )
    mean, var, count = hand_running_stats(convs, MOMENTUM)
    got_mean, got_var, got_count = stats_of(model)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_var, var, rtol=1e-12, atol=1e-14)
    assert got_count == count == 2


def test_ascent_steps_and_perturb_every():
    """K ascent steps: still one update. perturb_every=2: the reusing step of a SAM-type method
    has only its pass at θ + ρδ, which updates (the statistics keep following training)."""
    x, y = batch()
    model = SmallCNN().double()
    opt = create("gasam:ascent_steps=3", model.parameters(), rho=0.5, lr=0.01)
    opt.step(
        forward=update_stats_once(model, lambda: model(x)), loss_fn=lambda z: F.cross_entropy(z, y)
    )
    assert int(model.bn.num_batches_tracked) == 1
    for method, counts in [("sam", [1, 2, 3]), ("fsam", [1, 2, 3])]:
        model = SmallCNN().double()
        opt = create(method, model.parameters(), rho=0.5, lr=0.01, perturb_every=2)
        seen = []
        for _ in range(3):
            opt.step(
                forward=update_stats_once(model, lambda model=model: model(x)),
                loss_fn=lambda z: F.cross_entropy(z, y),
            )
            seen.append(int(model.bn.num_batches_tracked))
        assert seen == counts, method


def test_context_manager_restores_on_exit_and_on_error():
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.InstanceNorm1d(3, track_running_stats=True),
        nn.BatchNorm1d(3, track_running_stats=False),
    )
    evaluated = nn.BatchNorm1d(3)
    model.append(evaluated)
    evaluated.eval()
    x = torch.randn(4, 3, 5)
    before = copy.deepcopy(model.state_dict())
    assert tracking_layers(model) == [model[0], model[1]]
    with frozen_running_stats(model):
        out = model(x)
    ref = copy.deepcopy(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[0].track_running_stats and model[1].running_mean is not None
    assert not model[2].track_running_stats
    # outputs as an unfrozen forward's
    assert torch.equal(out, ref(x))
    # the unfrozen forward did move them: BatchNorm and InstanceNorm alike
    assert not torch.equal(ref[0].running_mean, before["0.running_mean"])
    assert not torch.equal(ref[1].running_mean, before["1.running_mean"])
    with pytest.raises(RuntimeError, match="boom"), frozen_running_stats(model):
        raise RuntimeError("boom")
    assert model[0].track_running_stats and model[1].running_var is not None
