"""HOW a curvature operator is reduced to numbers: top eigenpairs and the trace.

The solvers only call ``op.matmat`` / ``op.to_scipy()`` (see
:class:`flatlm.sharpness.operators.CurvatureOperator`), so they are independent of which matrix
(Hessian, Gauss–Newton, their difference) and which backend produce the products.
All random probes come from a seeded ``torch.Generator``: results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor

from flatlm._extras import require
from flatlm.sharpness.operators import CurvatureOperator

Which = Literal["LA", "LM", "SA"]


@dataclass
class EigenResult:
    """Eigenvalues sorted in descending order (for ``which="LA"``), optional unit eigenvectors
    as columns of a ``(dim, k)`` tensor, and the number of products spent."""

    eigenvalues: list[float]
    eigenvectors: Tensor | None
    num_matvecs: int
    converged: bool = True
    # Fixed-budget Lanczos: each Ritz pair's residual ||A y - θ y|| (y unit), which decides
    # ``converged``; empty for the other solvers (ARPACK checks its own).
    residuals: list[float] = field(default_factory=list)


@dataclass
class TraceEstimate:
    """Trace estimate with its standard error (0 when exact) and the products spent."""

    value: float
    stderr: float
    num_matvecs: int
    method: str


@contextmanager
def _progress(
    op: CurvatureOperator, enabled: bool, desc: str, total: int | None = None
) -> Iterator[None]:
    """A tqdm bar over the products of ``op`` (long solves on real models take minutes), with
    ``total`` products where the solver knows it in advance."""
    if not enabled:
        yield
        return
    tqdm = require("tqdm.auto", "sharpness", feature="progress=True").tqdm

    bar = tqdm(desc=desc, unit="mv", total=total)
    old = op.progress
    op.progress = bar.update
    try:
        yield
    finally:
        op.progress = old
        bar.close()


def _dense(op: CurvatureOperator) -> Tensor:
    """The full matrix from ``dim`` products (used when the dimension is tiny)."""
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    M = op.matmat(eye).double()
    return (M + M.T) / 2


def _order(vals: np.ndarray, which: Which) -> np.ndarray:
    if which == "LM":
        return np.argsort(-np.abs(vals))
    if which == "SA":
        return np.argsort(vals)
    return np.argsort(-vals)


def top_eigen(
    op: CurvatureOperator,
    k: int = 1,
    *,
    which: Which = "LA",
    tol: float = 1e-8,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    progress: bool = False,
) -> EigenResult:
    """Top-``k`` eigenpairs by implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``).

    ``which="LA"`` (default) gives the largest algebraic eigenvalues, i.e. the sharpest
    directions; a Hessian away from a minimum also has negative ones (use ``"SA"``) and
    ``"LM"`` orders by magnitude. ``eigsh`` needs ``k < dim``; for ``k >= dim - 1`` the dense
    matrix is built from ``dim`` products instead. If ARPACK does not converge within
    ``maxiter`` restarts, the converged part is returned with ``converged=False``.
    """
    k = int(k)
    if k < 1:
        raise ValueError("k must be >= 1")
    start = op.num_matvecs
    with _progress(op, progress, f"eigsh[{op.name}] (ARPACK, to its tolerance: no fixed total)"):
        if k >= op.dim - 1:
            vals_t, vecs_t = torch.linalg.eigh(_dense(op))
            vals, vecs = vals_t.cpu().numpy(), vecs_t.cpu().numpy()
            converged = True
        else:
            gen = torch.Generator().manual_seed(seed)
            v0 = torch.randn(op.dim, generator=gen, dtype=torch.float64).numpy()
            try:
                vals, vecs = eigsh(
                    op.to_scipy(), k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0
                )
                converged = True
            except ArpackNoConvergence as err:
                vals, vecs = err.eigenvalues, err.eigenvectors
                converged = False
    idx = _order(np.asarray(vals), which)[:k]
    vectors = None
    if return_vectors:
        vectors = torch.as_tensor(
            np.ascontiguousarray(vecs[:, idx]), dtype=op.dtype, device=op.device
        )
    return EigenResult([float(vals[i]) for i in idx], vectors, op.num_matvecs - start, converged)


def lanczos(
    op: CurvatureOperator,
    num_iters: int = 10,
    k: int = 1,
    *,
    seed: int = 0,
    tol: float = 1e-6,
    return_vectors: bool = False,
    progress: bool = False,
) -> EigenResult:
    """Fixed-budget Lanczos (full reorthogonalisation): exactly ``num_iters`` products.

    For cheap periodic logging, where a predictable cost matters more than convergence: the
    top Ritz value is a lower bound on λ_max that is usually within a few percent after 10-20
    iterations when the top eigenvalue is well separated. ``converged`` is the residual test
    ARPACK uses: every returned Ritz pair has ``||A y - θ y|| <= tol * |θ|``, the residual
    being ``|β_m s_m|`` (the next Lanczos coefficient times the Ritz vector's last entry in
    the Krylov basis), so it costs no product.
    """
    num_iters, k = int(num_iters), int(k)
    if num_iters < 1:
        raise ValueError(f"num_iters (Lanczos products) must be >= 1, got {num_iters}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    m = min(num_iters, op.dim)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(op.dim, generator=gen, dtype=torch.float64)
    q /= q.norm()
    Q = torch.zeros(op.dim, m, dtype=torch.float64)
    alpha = torch.zeros(m, dtype=torch.float64)
    beta = torch.zeros(m, dtype=torch.float64)
    start = op.num_matvecs
    used = m
    with _progress(op, progress, f"lanczos[{op.name}]", total=m):
        for j in range(m):
            Q[:, j] = q
            w = op.matvec(q.to(op.dtype)).double().cpu()
            alpha[j] = w @ q
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)  # twice is enough (Kahan)
            b = w.norm()
            beta_next = float(b)  # after the last product: the residual's scale
            if j + 1 < m:
                if b <= 1e-12 * max(1.0, float(alpha[: j + 1].abs().max())):
                    used = j + 1  # invariant subspace found: the Ritz values are exact
                    beta_next = 0.0
                    break
                beta[j] = b
                q = w / b
    T = (
        torch.diag(alpha[:used])
        + torch.diag(beta[: used - 1], 1)
        + torch.diag(beta[: used - 1], -1)
    )
    vals, S = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=True)[: min(k, used)]
    vectors = None
    if return_vectors:
        vectors = (Q[:, :used] @ S[:, order]).to(op.dtype).to(op.device)
    if used == op.dim:  # the whole space: the Ritz pairs are eigenpairs
        beta_next = 0.0
    residuals = [beta_next * abs(float(S[used - 1, i])) for i in order]
    theta = [float(vals[i]) for i in order]
    converged = all(r <= tol * abs(t) for r, t in zip(residuals, theta, strict=True))
    return EigenResult(theta, vectors, op.num_matvecs - start, converged, residuals)


def _probes(dim: int, n: int, gen: torch.Generator, distribution: str) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (dim, n), generator=gen, dtype=torch.int64).double() * 2 - 1
    if distribution == "normal":
        return torch.randn(dim, n, generator=gen, dtype=torch.float64)
    raise ValueError(f"unknown distribution {distribution!r}")


def _apply(op: CurvatureOperator, V: Tensor, block: int) -> Tensor:
    """``op @ V`` in column blocks (bounds the memory of vmapped products)."""
    cols = [
        op.matmat(V[:, i : i + block].to(op.dtype)).double().cpu()
        for i in range(0, V.shape[1], block)
    ]
    return torch.cat(cols, dim=1) if cols else torch.zeros(op.dim, 0, dtype=torch.float64)


def exact_trace(op: CurvatureOperator, *, block: int = 64, progress: bool = False) -> TraceEstimate:
    """Exact trace from the ``dim`` products ``e_iᵀ A e_i`` (when ``dim`` is small)."""
    total = 0.0
    start = op.num_matvecs
    with _progress(op, progress, f"trace[{op.name}]", total=op.dim):
        for i in range(0, op.dim, block):
            j = min(op.dim, i + block)
            E = torch.zeros(op.dim, j - i, dtype=torch.float64)
            E[torch.arange(i, j), torch.arange(j - i)] = 1.0
            AE = _apply(op, E, block)
            total += float(AE[torch.arange(i, j), torch.arange(j - i)].sum())
    return TraceEstimate(total, 0.0, op.num_matvecs - start, "exact")


def hutchinson_trace(
    op: CurvatureOperator,
    num_samples: int,
    *,
    seed: int = 0,
    distribution: str = "rademacher",
    block: int = 16,
    progress: bool = False,
) -> TraceEstimate:
    """Girard–Hutchinson: mean of ``vᵀAv`` over ``num_samples`` probes, with its standard error.

    With Rademacher probes the variance of one sample is ``2(‖A‖_F² − Σ A_ii²)``; the returned
    ``stderr`` is the empirical standard deviation over samples divided by √n.
    """
    if num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    V = _probes(op.dim, num_samples, gen, distribution)
    start = op.num_matvecs
    with _progress(op, progress, f"hutchinson[{op.name}]", total=num_samples):
        AV = _apply(op, V, block)
    samples = (V * AV).sum(0)
    se = float(samples.std(unbiased=True) / math.sqrt(num_samples)) if num_samples > 1 else math.inf
    return TraceEstimate(float(samples.mean()), se, op.num_matvecs - start, "hutchinson")


def hutchpp_trace(
    op: CurvatureOperator,
    num_matvecs: int,
    *,
    seed: int = 0,
    distribution: str = "rademacher",
    block: int = 16,
    progress: bool = False,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace plus Hutchinson on
    the rest. Uses ``num_matvecs`` products split in thirds; the error decays like 1/m instead
    of 1/√m when the spectrum is dominated by a few outliers (as Hessians of networks are).
    ``stderr`` is that of the Hutchinson part on the deflated remainder.
    """
    if num_matvecs < 3:
        raise ValueError("Hutch++ needs at least 3 products")
    gen = torch.Generator().manual_seed(seed)
    s = num_matvecs // 3
    n_g = num_matvecs - 2 * s
    S = _probes(op.dim, s, gen, distribution)
    G = _probes(op.dim, n_g, gen, distribution)
    start = op.num_matvecs
    with _progress(op, progress, f"hutch++[{op.name}]", total=num_matvecs):
        Q, _ = torch.linalg.qr(_apply(op, S, block))
        AQ = _apply(op, Q, block)
        G_perp = G - Q @ (Q.T @ G)
        AG = _apply(op, G_perp, block)
    top = float(torch.einsum("ij,ij->", Q, AQ))
    samples = (G_perp * AG).sum(0)
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(n_g)) if n_g > 1 else math.inf
    return TraceEstimate(top + mean, se, op.num_matvecs - start, "hutch++")


def trace(
    op: CurvatureOperator,
    num_samples: int,
    *,
    method: Literal["hutchpp", "hutchinson"] = "hutchpp",
    seed: int = 0,
    progress: bool = False,
) -> TraceEstimate:
    """Trace with a budget of ``num_samples`` products; exact when the budget covers ``dim``."""
    if num_samples >= op.dim:
        return exact_trace(op, progress=progress)
    if method == "hutchpp":
        return hutchpp_trace(op, num_samples, seed=seed, progress=progress)
    if method == "hutchinson":
        return hutchinson_trace(op, num_samples, seed=seed, progress=progress)
    raise ValueError(f"unknown trace method {method!r}")


def rayleigh_quotient(op: CurvatureOperator, v: Tensor) -> float:
    """``vᵀAv / vᵀv`` for one flat vector."""
    v = v.reshape(-1)
    Av = op.matvec(v).double()
    vd = v.double().to(Av.device)
    return float((vd @ Av) / (vd @ vd))
