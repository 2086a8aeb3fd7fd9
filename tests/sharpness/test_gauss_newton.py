"""The Gauss–Newton operator without curvlinops.

The default backend (reverse-mode autograd, torch alone) against an independent dense
G = Σ_b Jᵀ H_ℓ J built from Jacobians materialised with ``torch.autograd.functional.jacobian``
and an explicit H_ℓ (softmax cross-entropy: diag(p) − ppᵀ per position; squared error: 2I), on
tiny float64 models: token-level MLP, a transformer block with ``nn.LayerNorm`` and a tied head,
an LSTM (the workbench's other architecture; forward-mode AD has no rule for its CPU kernel), and
a regression loss. Then the optional curvlinops backend against the default (skipped when
curvlinops is not installed), and the default figures of ``sharpness_report`` with curvlinops
made unimportable.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sharpness_refs import make_gpt, snapshot
from torch import Tensor, nn
from torch.func import functional_call

from flatlm._extras import MissingExtraError
from flatlm.sharpness import (
    DEFAULT_FIGURES,
    ggn_operator,
    hessian_operator,
    sharpness_report,
    top_eigen,
)

# torch.func (functional_call, curvlinops) warns about its own use of torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

V = 5  # vocabulary / classes of the token models


class TokenMLP(nn.Module):
    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc1 = nn.Linear(d, 4)
        self.fc2 = nn.Linear(4, V)

    def forward(self, idx: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(self.emb(idx))))


class TinyLSTM(nn.Module):
    def __init__(self, d: int = 3, hidden: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, V)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.lstm(self.emb(idx))[0])


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def mse(out: Tensor, targets: Tensor) -> Tensor:
    return ((out - targets) ** 2).mean()


Case = tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], list[tuple[Tensor, Tensor]], str]


def _tokens(*shape: int) -> Tensor:
    return torch.randint(0, V, shape)


def make_case(name: str) -> Case:
    """(model, loss_fn, batches, loss kind); unequal batch sizes test the token weighting."""
    torch.manual_seed(7)
    if name == "token_mlp":
        return (
            TokenMLP().double(),
            ce,
            [(_tokens(2, 3), _tokens(2, 3)), (_tokens(1, 4), _tokens(1, 4))],
            "ce",
        )
    if name == "lstm":
        return (
            TinyLSTM().double(),
            ce,
            [(_tokens(2, 3), _tokens(2, 3)), (_tokens(1, 2), _tokens(1, 2))],
            "ce",
        )
    if name == "gpt_layernorm_tied":
        model, _, batches = make_gpt(torch_layernorm=True)  # nn.LayerNorm, head tied to emb
        return model, ce, batches, "ce"
    if name == "regression":
        batches = [
            (torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)),
            (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)),
        ]
        return Regressor().double(), mse, batches, "mse"
    raise KeyError(name)


def jacobian_ggn(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    kind: str,
    names: list[str] | None = None,
) -> Tensor:
    """Σ_b J_bᵀ H_b J_b with J_b materialised by torch.autograd.functional.jacobian and H_b the
    Hessian of batch b's share of the mean loss w.r.t. its outputs, written out by hand."""
    params = dict(model.named_parameters())
    names = names or list(params)
    theta = tuple(params[n].detach().clone() for n in names)
    total = sum(y.numel() for _, y in batches)  # the mean runs over all targets of all batches
    dim = sum(t.numel() for t in theta)
    G = torch.zeros(dim, dim, dtype=torch.float64)
    for x, _ in batches:

        def outputs(*ps: Tensor, x: Tensor = x) -> Tensor:
            return functional_call(model, dict(zip(names, ps, strict=True)), (x,))

        z = outputs(*theta).detach()
        jac = torch.autograd.functional.jacobian(outputs, theta)
        J = torch.cat([j.reshape(z.numel(), -1) for j in jac], dim=1)  # (outputs, dim)
        if kind == "ce":  # 1/total · (diag(p) − ppᵀ) per position, block-diagonal
            p = z.reshape(-1, z.shape[-1]).softmax(-1)
            blocks = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            H = torch.block_diag(*blocks) / total
        else:  # mean squared error over all `total` target elements: 2/total · I
            H = 2.0 * torch.eye(z.numel(), dtype=torch.float64) / total
        G += J.T @ H @ J
    return G


def test_the_defaults_are_autograd() -> None:
    for fn, arg in ((ggn_operator, "backend"), (hessian_operator, "backend")):
        assert inspect.signature(fn).parameters[arg].default == "autograd"
    params = inspect.signature(sharpness_report).parameters
    assert params["ggn_backend"].default == "autograd"
    assert params["hessian_backend"].default == "autograd"


@pytest.mark.parametrize("name", ["token_mlp", "lstm", "regression"])
def test_default_ggn_equals_explicit_jacobian_product(name: str) -> None:
    """The whole matrix, column by column, against Jᵀ H J from materialised Jacobians."""
    model, loss_fn, batches, kind = make_case(name)
    G = jacobian_ggn(model, batches, kind)
    op = ggn_operator(model, loss_fn, batches)
    M = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    torch.testing.assert_close(M, G, rtol=1e-10, atol=1e-13 * float(G.abs().max()))
    assert torch.allclose(M, M.T, rtol=0, atol=1e-13 * float(G.abs().max()))
    assert float(torch.linalg.eigvalsh((M + M.T) / 2).min()) > -1e-12  # GN is PSD
    assert float(G.abs().max()) > 1e-3  # a non-trivial reference


def test_default_ggn_on_layernorm_transformer_with_tied_head() -> None:
    """nn.LayerNorm (torch.func's *second* derivative of it is wrong in torch 2.13; the GN needs
    first derivatives only) and an output head tied to the embedding."""
    model, loss_fn, batches, kind = make_case("gpt_layernorm_tied")
    G = jacobian_ggn(model, batches, kind)
    op = ggn_operator(model, loss_fn, batches)
    Vs = torch.randn(op.dim, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(op.matmat(Vs), G @ Vs, rtol=1e-10, atol=1e-12)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    got = top_eigen(op, 1, tol=1e-10).eigenvalues[0]
    assert abs(got - lam) / lam < 1e-8


def test_parameter_subset_is_the_sub_block() -> None:
    model, loss_fn, batches, kind = make_case("token_mlp")
    names = [n for n, _ in model.named_parameters()]
    full = jacobian_ggn(model, batches, kind)
    sub_names = ["fc2.weight", "fc2.bias"]
    op = ggn_operator(model, loss_fn, batches, params="fc2.*")
    assert op.param_names == sub_names
    M = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    start = sum(sizes[n] for n in names[: names.index("fc2.weight")])
    block = full[start : start + op.dim, start : start + op.dim]
    torch.testing.assert_close(M, block, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(M, jacobian_ggn(model, batches, kind, sub_names))


def test_products_leave_the_model_untouched() -> None:
    model, loss_fn, batches, _ = make_case("lstm")
    snap = snapshot(model)
    op = ggn_operator(model, loss_fn, batches)
    op.matmat(torch.ones(op.dim, 2, dtype=torch.float64))
    for p, s in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), s)
        assert p.grad is None


def test_default_figures_need_no_curvlinops(monkeypatch: pytest.MonkeyPatch) -> None:
    """sharpness_report's default figures (what `flatlm sharpness` computes) with curvlinops
    unimportable: every figure is there and λ_max(GN) is the dense one."""
    monkeypatch.setitem(sys.modules, "curvlinops", None)  # `import curvlinops` now raises
    model, loss_fn, batches, kind = make_case("token_mlp")
    rep = sharpness_report(model, loss_fn, batches, lanczos_tol=1e-10)
    assert set(DEFAULT_FIGURES) >= {"hessian", "ggn"}
    lam = float(torch.linalg.eigvalsh(jacobian_ggn(model, batches, kind))[-1])
    assert rep["ggn.lambda_max"] == pytest.approx(lam, rel=1e-8)
    for key in (
        "hessian.lambda_max",
        "hessian.top_rq_ggn",
        "sam.sam_sharpness",
        "corruption.increase",
    ):
        assert isinstance(rep[key], float), key


def test_missing_curvlinops_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "curvlinops", None)
    model, loss_fn, batches, _ = make_case("token_mlp")
    for make in (ggn_operator, hessian_operator):
        with pytest.raises(MissingExtraError, match="--no-deps curvlinops-for-pytorch") as info:
            make(model, loss_fn, batches, backend="curvlinops")
        assert info.value.name == "curvlinops" and info.value.extra is None


needs_curvlinops = pytest.mark.skipif(
    importlib.util.find_spec("curvlinops") is None,
    reason="curvlinops is an optional backend, not installed (docs/install.md)",
)


@needs_curvlinops
@pytest.mark.parametrize("name", ["token_mlp", "lstm", "gpt_layernorm_tied", "regression"])
def test_curvlinops_ggn_matches_default(name: str) -> None:
    model, loss_fn, batches, _ = make_case(name)
    default = ggn_operator(model, loss_fn, batches)
    other = ggn_operator(model, loss_fn, batches, backend="curvlinops")
    Vs = torch.randn(
        default.dim, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    torch.testing.assert_close(other.matmat(Vs), default.matmat(Vs), rtol=1e-11, atol=1e-13)


@needs_curvlinops
def test_curvlinops_hessian_matches_default_without_layernorm() -> None:
    model, loss_fn, batches, _ = make_case("token_mlp")
    default = hessian_operator(model, loss_fn, batches)
    other = hessian_operator(model, loss_fn, batches, backend="curvlinops")
    Vs = torch.randn(
        default.dim, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    torch.testing.assert_close(other.matmat(Vs), default.matmat(Vs), rtol=1e-11, atol=1e-13)
