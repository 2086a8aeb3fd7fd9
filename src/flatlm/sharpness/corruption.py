"""Loss increases under perturbations: SAM-sharpness and random "virtual corruption".

SAM-sharpness is the worst-case (first-order) increase L(θ+ε) − L(θ) for the method's ε.
The corruption view (GA-SAM) asks instead how much the loss rises on average when the
parameters are corrupted at random, as a distribution shift between training and test data
would do: E[L(θ+ε)] − L(θ) over Gaussian ε of relative size σ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from flatlm._extras import require
from flatlm.sharpness._common import (
    LossFn,
    ParamSpec,
    loss_value,
    materialise_batches,
    norm,
    preserved,
    select_params,
    shifted,
)
from flatlm.sharpness.decomposition import EpsSpec, resolve_epsilon

CorruptionMode = Literal["elementwise", "isotropic"]


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: ParamSpec = None,
    rho: float = 0.05,
    eps: EpsSpec = None,
    optimizer: object | None = None,
    eval_mode: bool = True,
) -> dict[str, float]:
    """``L(θ+ε) − L(θ)`` on the batches for ε as in :func:`resolve_epsilon` (SAM's by default)."""
    bs = materialise_batches(batches)
    sel = select_params(model, params)
    ps = [p for _, p in sel]
    with preserved(model, eval_mode):
        epsilon = resolve_epsilon(model, loss_fn, bs, ps, rho=rho, eps=eps, optimizer=optimizer)
        loss0 = loss_value(model, loss_fn, bs)
        with shifted(ps, epsilon):
            loss1 = loss_value(model, loss_fn, bs)
    eps_t = [e for e in epsilon if e is not None]
    return {
        "loss": loss0,
        "loss_perturbed": loss1,
        "sam_sharpness": loss1 - loss0,
        "eps_norm": float(norm(eps_t)) if eps_t else 0.0,
    }


@dataclass
class CorruptionEstimate:
    """Mean loss increase over ``num_samples`` corruptions and its standard error."""

    loss: float
    mean_increase: float
    stderr: float
    num_samples: int
    sigma: float
    mode: str

    def summary(self) -> dict[str, float | int | str]:
        """Plain JSON-serialisable values."""
        return {
            "loss": self.loss,
            "corruption_increase": self.mean_increase,
            "corruption_stderr": self.stderr,
            "corruption_samples": self.num_samples,
            "corruption_sigma": self.sigma,
            "corruption_mode": self.mode,
        }


def corruption_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: ParamSpec = None,
    sigma: float = 0.01,
    num_samples: int = 8,
    mode: CorruptionMode = "elementwise",
    seed: int = 0,
    antithetic: bool = False,
    eval_mode: bool = True,
    progress: bool = False,
) -> CorruptionEstimate:
    """Expected loss increase ``E[L(θ+ε)] − L(θ)`` under random corruption, by Monte Carlo.

    ``mode="elementwise"`` (default): ε_i ~ N(0, (σ|θ_i|)²), multiplicative noise, invariant to
    rescaling a layer, so a layer is corrupted in proportion to its own size (zero entries, e.g.
    zero-initialised biases, are then never corrupted). ``mode="isotropic"``:
    ε ~ N(0, (σ‖θ‖/√n)² I), the same expected norm σ‖θ‖ spread evenly over the n entries.
    Second order, both give ½ E[εᵀHε]: a curvature average weighted by the corruption's
    covariance. ``stderr`` is the sample standard deviation / √num_samples. With
    ``antithetic=True`` each draw also evaluates −ε and averages the pair (cancels the
    first-order term gᵀε, which dominates the variance away from a minimum); a pair is then
    one sample.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    bs = materialise_batches(batches)
    sel = select_params(model, params)
    ps = [p for _, p in sel]
    gen = torch.Generator().manual_seed(seed)
    increases: list[float] = []
    with preserved(model, eval_mode):
        loss0 = loss_value(model, loss_fn, bs)
        theta = [p.detach().clone() for p in ps]
        n = sum(p.numel() for p in ps)
        iso_scale = sigma * float(norm(theta)) / math.sqrt(n)
        it = range(num_samples)
        if progress:
            tqdm = require("tqdm.auto", "sharpness", feature="progress=True").tqdm

            it = tqdm(it, desc="corruption")
        for _ in it:
            z = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in ps]
            if mode == "elementwise":
                eps = [sigma * t.abs() * zi for t, zi in zip(theta, z, strict=True)]
            elif mode == "isotropic":
                eps = [iso_scale * zi for zi in z]
            else:
                raise ValueError(f"unknown corruption mode {mode!r}")
            with shifted(ps, eps):
                inc = loss_value(model, loss_fn, bs) - loss0
            if antithetic:
                with shifted(ps, [-e for e in eps]):
                    inc = 0.5 * (inc + loss_value(model, loss_fn, bs) - loss0)
            increases.append(inc)
    t = torch.tensor(increases, dtype=torch.float64)
    se = float(t.std(unbiased=True) / math.sqrt(len(increases))) if len(increases) > 1 else math.inf
    return CorruptionEstimate(loss0, float(t.mean()), se, len(increases), sigma, mode)
