"""WHAT curvature: the Hessian, the Gauss–Newton matrix and their difference as linear operators.

Every operator acts on the flat vector of the selected parameters (in ``model.named_parameters()``
order) and represents the curvature of the token-weighted mean loss over all given batches (see
:mod:`flatlm.sharpness._common`). How the spectrum is then computed lives in
:mod:`flatlm.sharpness.solvers`, so any operator can go with any solver.

Backends:

- ``"autograd"`` (the default of both): reverse-mode ``torch.autograd`` only. The Hessian by
  double backward; the Gauss–Newton product ``G v = Jᵀ H_ℓ J v`` with ``J v`` by the double-vjp
  trick (``u ↦ Jᵀu`` is linear, so differentiating it w.r.t. ``u`` along ``v`` gives ``J v``),
  ``H_ℓ J v`` by double backward of the loss w.r.t. the logits alone (for cross-entropy that is
  ``(diag(p) − ppᵀ) J v`` per position) and ``Jᵀ(·)`` by one backward. It works for any model
  autograd can differentiate twice, needs nothing beyond torch, and was the fastest on CPU
  (docs/sharpness.md).
- ``"curvlinops"`` (optional; ``curvlinops-for-pytorch`` is not a dependency of flatlm, see
  docs/install.md): curvlinops' ``HessianLinearOperator`` / ``GGNLinearOperator`` (torch.func:
  ``jvp`` of ``jacrev`` / ``jvp`` + ``vjp``). They take any logit shape and any loss, so
  ``(B, T, V)`` logits need no flattening; the mean over tokens is kept by giving curvlinops each
  batch's token count as its "batch size". An independent implementation, tested against the
  default. Forward-mode AD is missing for some ops (the CPU LSTM's ``mkldnn_rnn_layer``), and
  torch.func's second derivatives of ``F.layer_norm`` (input and weight together) are wrong in
  torch 2.13 (an asymmetric "Hessian"; cf. pytorch/pytorch#196700), i.e. for every transformer
  with ``nn.LayerNorm``; the GGN only needs first derivatives of the model and is unaffected.
- ``"fd"`` (Hessian only): central finite differences of gradients, for models where double
  backward is unavailable or too costly. Written here because curvlinops has no such operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from flatlm._extras import require
from flatlm.sharpness._common import (
    Batch,
    LossFn,
    ParamSpec,
    flat,
    materialise_batches,
    norm,
    select_params,
    shifted,
    unflat,
)

Backend = Literal["curvlinops", "autograd", "fd"]

# curvlinops-for-pytorch declares backpack-for-pytorch, which pulls torchvision and with it a CUDA
# build of torch; the operators used here import neither, hence --no-deps for it alone.
CURVLINOPS_INSTALL = (
    "pip install einops opt-einsum einconv linear_operator && "
    "pip install --no-deps curvlinops-for-pytorch==3.0.1"
)


class CurvatureOperator:
    """A symmetric matrix known only through products, on the flat selected-parameter space.

    ``matmat(V)`` takes and returns a ``(dim, k)`` tensor in the parameters' dtype.
    ``num_matvecs`` counts columns multiplied so far (the cost measure of every solver).
    """

    def __init__(
        self,
        name: str,
        matmat: Callable[[Tensor], Tensor],
        params: Sequence[tuple[str, Tensor]],
    ) -> None:
        self.name = name
        self._matmat = matmat
        self.param_names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_matvecs = 0
        self.progress: Callable[[int], object] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """Square shape ``(dim, dim)``."""
        return (self.dim, self.dim)

    def matmat(self, V: Tensor) -> Tensor:
        """Multiply onto the columns of ``V`` (shape ``(dim, k)``)."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected shape ({self.dim}, k), got {tuple(V.shape)}")
        V = V.to(dtype=self.dtype, device=self.device)
        out = self._matmat(V)
        self.num_matvecs += V.shape[1]
        if self.progress is not None:
            self.progress(V.shape[1])
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """Multiply onto one flat vector."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matvec(V) if V.ndim == 1 else self.matmat(V)

    def __sub__(self, other: CurvatureOperator) -> CurvatureOperator:
        if other.param_names != self.param_names:
            raise ValueError("operators act on different parameter selections")

        def mm(V: Tensor) -> Tensor:
            return self.matmat(V) - other.matmat(V)

        return CurvatureOperator(
            f"{self.name}-{other.name}", mm, list(zip(self.param_names, self.params, strict=True))
        )

    def to_scipy(self) -> LinearOperator:
        """A float64 SciPy ``LinearOperator`` (what ``eigsh`` needs); products run in torch."""

        def mv(x: np.ndarray) -> np.ndarray:
            X = torch.as_tensor(np.asarray(x), device=self.device)
            X = X.reshape(self.dim, -1)
            out = self.matmat(X).detach().to("cpu", torch.float64).numpy()
            return out.reshape(x.shape)

        return LinearOperator(
            self.shape, matvec=mv, rmatvec=mv, matmat=mv, rmatmat=mv, dtype=np.float64
        )


# --------------------------------------------------------------------------------------------
# curvlinops backend
# --------------------------------------------------------------------------------------------


class _Model(nn.Module):
    """Adapts ``model(inputs)`` to curvlinops' data format ``X = {"inputs": ..., "n": count}``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, X: dict) -> Tensor:
        return self.model(X["inputs"])


class _Loss(nn.Module):
    """Gives a plain ``loss_fn`` the ``reduction`` attribute curvlinops reads."""

    reduction = "mean"

    def __init__(self, loss_fn: LossFn) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(logits, targets)


def _curvlinops_matmat(
    kind: str,
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[Tensor],
) -> Callable[[Tensor], Tensor]:
    curvlinops = require(
        "curvlinops",
        None,
        feature='backend="curvlinops"',
        hint=CURVLINOPS_INSTALL + " (see docs/install.md; the default backend needs no install)",
    )
    cls = curvlinops.HessianLinearOperator if kind == "hessian" else curvlinops.GGNLinearOperator
    # curvlinops weights batch b by batch_size_fn(X_b) / num_data for reduction="mean"; with the
    # token counts that is exactly the token-weighted mean loss of _common.
    data = [({"inputs": b.inputs, "n": b.count}, b.targets) for b in batches]
    op = cls(
        _Model(model),
        _Loss(loss_fn),
        list(params),
        data,
        check_deterministic=False,
        num_data=sum(b.count for b in batches),
        batch_size_fn=lambda X: X["n"],
    )

    def mm(V: Tensor) -> Tensor:
        return op @ V

    return mm


# --------------------------------------------------------------------------------------------
# autograd backend (double backward)
# --------------------------------------------------------------------------------------------


def _grads(outputs: Tensor | Sequence[Tensor], inputs: Sequence[Tensor], **kw) -> list[Tensor]:
    gs = torch.autograd.grad(outputs, list(inputs), allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs, strict=True)]


def _autograd_hessian_matmat(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Sequence[Tensor]
) -> Callable[[Tensor], Tensor]:
    def mm(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for b in batches:
            with torch.enable_grad():
                loss = loss_fn(model(b.inputs), b.targets) * b.weight
                g = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
                used = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
                if not used:
                    continue
                for j in range(V.shape[1]):
                    vs = unflat(V[:, j], params)
                    hv = _grads(
                        [g[i] for i in used],
                        params,
                        grad_outputs=[vs[i] for i in used],
                        retain_graph=True,
                    )
                    out[:, j] += flat(hv)
        return out

    return mm


def _autograd_ggn_matmat(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch], params: Sequence[Tensor]
) -> Callable[[Tensor], Tensor]:
    # G v = Σ_b Jᵀ H_ℓ J v, reverse mode only (works wherever the autograd Hessian does):
    # - J v by the double-vjp trick: u ↦ Jᵀu is linear, so d(Jᵀu)/du applied to v gives J v
    #   without forward-mode AD (which some ops lack, e.g. the CPU LSTM's mkldnn_rnn_layer);
    # - H_ℓ (J v) by double backward of the loss w.r.t. the detached logits z alone (logit-sized;
    #   for mean cross-entropy over n tokens it is (diag(p) − ppᵀ)/n per position);
    # - Jᵀ(·) by one more backward through the model's graph, kept for all columns.
    def mm(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for b in batches:
            with torch.enable_grad():
                logits = model(b.inputs)
                z = logits.detach().requires_grad_(True)
                r = torch.autograd.grad(loss_fn(z, b.targets) * b.weight, z, create_graph=True)[0]
                if not r.requires_grad:  # loss linear in the logits: H_ℓ = 0
                    continue
                u = torch.zeros_like(logits, requires_grad=True)
                ju = torch.autograd.grad(
                    logits, list(params), grad_outputs=u, create_graph=True, allow_unused=True
                )
                used = [i for i, gi in enumerate(ju) if gi is not None]
                if not used:
                    continue
                for j in range(V.shape[1]):
                    vs = unflat(V[:, j], params)
                    jv = torch.autograd.grad(
                        [ju[i] for i in used],
                        u,
                        grad_outputs=[vs[i] for i in used],
                        retain_graph=True,
                    )[0]
                    hjv = torch.autograd.grad(r, z, grad_outputs=jv, retain_graph=True)[0]
                    out[:, j] += flat(_grads(logits, params, grad_outputs=hjv, retain_graph=True))
        return out

    return mm


# --------------------------------------------------------------------------------------------
# finite-difference backend
# --------------------------------------------------------------------------------------------


def default_fd_step(dtype: torch.dtype) -> float:
    """Relative step ``δ = eps^(1/3) / 5``: the cube root balances O(δ²) truncation against
    O(eps/δ) rounding; the factor 1/5 was tuned on small MLP/GPT models, whose third derivatives
    along ‖θ‖-sized steps are large (float64: 1.2e-6, float32: 1e-3)."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0) / 5.0


def _fd_hessian_matmat(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    params: Sequence[Tensor],
    rel_step: float | None,
) -> Callable[[Tensor], Tensor]:
    delta = default_fd_step(params[0].dtype) if rel_step is None else rel_step

    def grad_at(shift: list[Tensor]) -> Tensor:
        total = [torch.zeros_like(p) for p in params]
        with shifted(params, shift), torch.enable_grad():
            for b in batches:
                loss = loss_fn(model(b.inputs), b.targets) * b.weight
                for acc, g in zip(total, _grads(loss, params), strict=True):
                    acc.add_(g)
        return flat(total)

    def mm(V: Tensor) -> Tensor:
        theta_norm = float(norm([p.detach() for p in params]))
        out = torch.zeros_like(V)
        for j in range(V.shape[1]):
            v = V[:, j]
            vn = float(v.double().norm())
            if vn == 0.0:
                continue
            # ‖h v‖ = δ ‖θ‖: the step is a fixed fraction of the parameters' scale
            h = delta * (theta_norm if theta_norm > 0 else 1.0) / vn
            vs = unflat(v * h, params)
            gp = grad_at(vs)
            gm = grad_at([-x for x in vs])
            out[:, j] = (gp - gm) / (2 * h)
        return out

    return mm


# --------------------------------------------------------------------------------------------
# public constructors
# --------------------------------------------------------------------------------------------


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]] | Sequence[Batch],
    *,
    params: ParamSpec = None,
    backend: Backend = "autograd",
    fd_rel_step: float | None = None,
) -> CurvatureOperator:
    """Hessian ∇²L of the mean loss over ``batches`` w.r.t. the selected parameters.

    ``backend="fd"`` uses central differences with step ``h = δ‖θ‖/‖v‖`` (``δ = fd_rel_step``,
    default :func:`default_fd_step`); see docs/sharpness.md for its accuracy. The operator is
    lazy: products use the model as it is then (call ``model.eval()`` first; the high-level
    functions do).
    """
    bs = _as_batches(batches)
    sel = select_params(model, params)
    ps = [p for _, p in sel]
    if backend == "curvlinops":
        mm = _curvlinops_matmat("hessian", model, loss_fn, bs, ps)
    elif backend == "autograd":
        mm = _autograd_hessian_matmat(model, loss_fn, bs, ps)
    elif backend == "fd":
        mm = _fd_hessian_matmat(model, loss_fn, bs, ps, fd_rel_step)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return CurvatureOperator("hessian", _no_grad_state(mm), sel)


def ggn_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Tensor, Tensor]] | Sequence[Batch],
    *,
    params: ParamSpec = None,
    backend: Backend = "autograd",
) -> CurvatureOperator:
    """Gauss–Newton matrix ``Σ_b w_b J_bᵀ H_ℓ J_b`` (H_ℓ = ∇²_F ℓ) w.r.t. the selected params.

    ``backend="autograd"`` (default) needs torch alone; ``"curvlinops"`` is the optional
    curvlinops implementation (same matrix; see the module docstring)."""
    bs = _as_batches(batches)
    sel = select_params(model, params)
    ps = [p for _, p in sel]
    if backend == "curvlinops":
        mm = _curvlinops_matmat("ggn", model, loss_fn, bs, ps)
    elif backend == "autograd":
        mm = _autograd_ggn_matmat(model, loss_fn, bs, ps)
    else:
        raise ValueError(f"backend {backend!r} is not available for the Gauss–Newton matrix")
    return CurvatureOperator("ggn", _no_grad_state(mm), sel)


def _as_batches(batches: Iterable[tuple[Tensor, Tensor]] | Sequence[Batch]) -> list[Batch]:
    if isinstance(batches, Sequence) and batches and all(isinstance(b, Batch) for b in batches):
        return list(batches)  # type: ignore[arg-type]
    return materialise_batches(batches)  # type: ignore[arg-type]


def _no_grad_state(mm: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Products never leave graphs or ``.grad`` behind and return detached tensors."""

    def wrapped(V: Tensor) -> Tensor:
        return mm(V).detach()

    return wrapped
