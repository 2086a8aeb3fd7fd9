"""One call that gathers the sharpness figures as a flat dict of plain numbers.

Used by ``flatlm sharpness CHECKPOINT`` (everything) and for periodic logging during training
(:func:`quick_sharpness`: a fixed, small number of products on a fixed batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from flatlm.sharpness._common import LossFn, ParamSpec, materialise_batches, preserved
from flatlm.sharpness.corruption import CorruptionMode, corruption_sharpness, sam_sharpness
from flatlm.sharpness.decomposition import EpsSpec, sam_decomposition
from flatlm.sharpness.operators import Backend, CurvatureOperator, ggn_operator, hessian_operator
from flatlm.sharpness.solvers import EigenResult, lanczos, rayleigh_quotient, top_eigen, trace

ALL_FIGURES = ("hessian", "ggn", "residual", "decomposition", "sam_sharpness", "corruption")
DEFAULT_FIGURES = ("hessian", "ggn", "decomposition", "sam_sharpness", "corruption")

Value = float | int | str | bool | None


def _clean(x: float | None) -> float | None:
    """JSON has no inf/NaN: undefined figures become ``None``."""
    return None if x is None or not math.isfinite(x) else float(x)


def _spectrum(
    op: CurvatureOperator,
    prefix: str,
    out: dict[str, Value],
    *,
    top_k: int,
    trace_samples: int,
    trace_method: str,
    lanczos_iters: int | None,
    tol: float,
    maxiter: int | None,
    seed: int,
    progress: bool,
    vectors: bool,
) -> EigenResult:
    if lanczos_iters is not None:
        res = lanczos(
            op, lanczos_iters, top_k, seed=seed, tol=tol, return_vectors=vectors, progress=progress
        )
    else:
        res = top_eigen(
            op,
            top_k,
            tol=tol,
            maxiter=maxiter,
            seed=seed,
            return_vectors=vectors,
            progress=progress,
        )
    for i, v in enumerate(res.eigenvalues, start=1):
        out[f"{prefix}.eig_{i}"] = _clean(v)
    out[f"{prefix}.lambda_max"] = _clean(res.eigenvalues[0])
    out[f"{prefix}.eig_converged"] = res.converged
    if res.residuals:  # the fixed-budget Lanczos's evidence for it
        out[f"{prefix}.eig_residual"] = _clean(max(res.residuals))
    out[f"{prefix}.eig_matvecs"] = res.num_matvecs
    if trace_samples > 0:
        method = trace_method  # "hutchpp" or "hutchinson"; trace() rejects anything else
        tr = trace(op, trace_samples, method=method, seed=seed + 1, progress=progress)  # type: ignore[arg-type]
        out[f"{prefix}.trace"] = _clean(tr.value)
        out[f"{prefix}.trace_stderr"] = _clean(tr.stderr)
        out[f"{prefix}.trace_method"] = tr.method
        out[f"{prefix}.trace_matvecs"] = tr.num_matvecs
    return res


def check_budgets(top_k: int, lanczos_iters: int | None, trace_samples: int) -> None:
    """Counts a report can be made with, else a ValueError naming the one that is not."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k (eigenvalues per matrix) must be >= 1, got {top_k!r}")
    if lanczos_iters is not None and (not isinstance(lanczos_iters, int) or lanczos_iters < 1):
        raise ValueError(f"lanczos_iters (products) must be >= 1, got {lanczos_iters!r}")
    if not isinstance(trace_samples, int) or trace_samples < 0:
        raise ValueError(f"trace_samples must be >= 0 (0 = no trace), got {trace_samples!r}")


def sharpness_report(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: ParamSpec = None,
    what: Sequence[str] = DEFAULT_FIGURES,
    top_k: int = 1,
    trace_samples: int = 0,
    trace_method: str = "hutchpp",
    lanczos_iters: int | None = None,
    lanczos_tol: float = 1e-6,
    lanczos_maxiter: int | None = None,
    hessian_backend: Backend = "autograd",
    ggn_backend: Backend = "autograd",
    rho: float = 0.05,
    eps: EpsSpec = None,
    optimizer: object | None = None,
    sigma: float = 0.01,
    corruption_samples: int = 8,
    corruption_mode: CorruptionMode = "elementwise",
    seed: int = 0,
    eval_mode: bool = True,
    progress: bool = False,
) -> dict[str, Value]:
    """Sharpness figures of the mean loss over ``batches`` at the model's current parameters.

    ``what`` picks among ``ALL_FIGURES``: ``"hessian"`` / ``"ggn"`` / ``"residual"`` (H − GN):
    top-``top_k`` eigenvalues (ARPACK Lanczos to ``lanczos_tol``, or exactly ``lanczos_iters``
    products when given) and, if ``trace_samples > 0``, the trace (Hutch++ or Hutchinson with that
    many products; exact once it reaches the dimension). With both ``"hessian"`` and ``"ggn"``,
    also the Rayleigh quotients of H's top eigenvector v under GN and under H − GN
    (``hessian.top_rq_ggn`` + ``hessian.top_rq_residual`` = λ_max(H)). ``"decomposition"``: the
    functional/logit split of SAM's gradient; ``"sam_sharpness"``: L(θ+ε) − L(θ) (ε from
    ``eps``, ``optimizer.perturbation()`` or SAM's ρ g/‖g‖); ``"corruption"``: mean loss
    increase under random corruption of relative size ``sigma``. The backends are those of
    :mod:`flatlm.sharpness.operators` (``"fd"``: Hessian only; the defaults need torch alone,
    ``"curvlinops"`` needs curvlinops installed). Model, ``.grad`` and train/eval flags are
    left exactly as they were. Returns a flat dict of JSON-serialisable values.
    """
    unknown = set(what) - set(ALL_FIGURES)
    if unknown:
        raise ValueError(f"unknown figures {sorted(unknown)}; choose from {ALL_FIGURES}")
    check_budgets(top_k, lanczos_iters, trace_samples)
    bs = materialise_batches(batches)
    out: dict[str, Value] = {}
    spec = dict(
        top_k=top_k,
        trace_samples=trace_samples,
        trace_method=trace_method,
        lanczos_iters=lanczos_iters,
        tol=lanczos_tol,
        maxiter=lanczos_maxiter,
        seed=seed,
        progress=progress,
    )
    batch_pairs = [(b.inputs, b.targets) for b in bs]
    with preserved(model, eval_mode):
        h_op = g_op = None
        h_res = None
        if {"hessian", "residual"} & set(what):
            h_op = hessian_operator(model, loss_fn, bs, params=params, backend=hessian_backend)
            out["num_params"] = h_op.dim
        if {"ggn", "residual"} & set(what):
            g_op = ggn_operator(model, loss_fn, bs, params=params, backend=ggn_backend)
            out["num_params"] = g_op.dim
        if "hessian" in what and h_op is not None:
            h_res = _spectrum(h_op, "hessian", out, vectors="ggn" in what, **spec)
        if "ggn" in what and g_op is not None:
            _spectrum(g_op, "ggn", out, vectors=False, **spec)
            if h_res is not None and h_res.eigenvectors is not None:
                v = h_res.eigenvectors[:, 0]
                q_h = rayleigh_quotient(h_op, v)  # type: ignore[arg-type]
                q_g = rayleigh_quotient(g_op, v)
                out["hessian.top_rq_hessian"] = _clean(q_h)
                out["hessian.top_rq_ggn"] = _clean(q_g)
                out["hessian.top_rq_residual"] = _clean(q_h - q_g)
                out["hessian.top_ggn_fraction"] = _clean(q_g / q_h) if q_h != 0 else None
        if "residual" in what and h_op is not None and g_op is not None:
            _spectrum(h_op - g_op, "residual", out, vectors=False, **spec)
    if "decomposition" in what:
        dec = sam_decomposition(
            model,
            loss_fn,
            batch_pairs,
            params=params,
            rho=rho,
            eps=eps,
            optimizer=optimizer,
            eval_mode=eval_mode,
        )
        for key, val in dec.summary().items():
            out[f"sam.{key}"] = _clean(val)
    elif "sam_sharpness" in what:
        for key, val in sam_sharpness(
            model,
            loss_fn,
            batch_pairs,
            params=params,
            rho=rho,
            eps=eps,
            optimizer=optimizer,
            eval_mode=eval_mode,
        ).items():
            out[f"sam.{key}"] = _clean(val)
    if "corruption" in what:
        est = corruption_sharpness(
            model,
            loss_fn,
            batch_pairs,
            params=params,
            sigma=sigma,
            num_samples=corruption_samples,
            mode=corruption_mode,
            seed=seed,
            eval_mode=eval_mode,
            progress=progress,
        )
        for key, val in est.summary().items():
            out[key.replace("corruption_", "corruption.") if key != "loss" else "loss"] = (
                _clean(val) if isinstance(val, float) else val
            )
    return out


def quick_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    params: ParamSpec = None,
    lanczos_iters: int = 10,
    rho: float = 0.05,
    hessian_backend: Backend = "autograd",
    seed: int = 0,
) -> dict[str, Value]:
    """The cheap subset for periodic logging: λ_max(H) from exactly ``lanczos_iters`` products
    (a lower bound; fixed cost) and the logit/functional ratio of SAM's gradient. Use a fixed
    batch across calls so the series is comparable."""
    return sharpness_report(
        model,
        loss_fn,
        batches,
        params=params,
        what=("hessian", "decomposition"),
        top_k=1,
        lanczos_iters=lanczos_iters,
        rho=rho,
        hessian_backend=hessian_backend,
        seed=seed,
    )
