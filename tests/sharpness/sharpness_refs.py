"""Small float64 models and dense references (torch.func), independent of flatlm.sharpness."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

VOCAB = 11


def ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over all positions, logits of any shape (..., V)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class MLP(nn.Module):
    def __init__(self, d_in: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class ManualLayerNorm(nn.Module):
    """LayerNorm from elementary ops (same parameter names as ``nn.LayerNorm``).

    torch.func's second derivatives of ``F.layer_norm`` w.r.t. input and weight together are
    wrong in torch 2.13 (asymmetric Hessian; cf. pytorch/pytorch#196700), so the dense
    torch.func reference uses this version; autograd's double backward of ``F.layer_norm`` is
    right and is checked against it.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(-1, keepdim=True)
        v = ((x - m) ** 2).mean(-1, keepdim=True)
        return (x - m) / torch.sqrt(v + self.eps) * self.weight + self.bias


class TinyGPT(nn.Module):
    """Embedding + one pre-LN causal self-attention/MLP block + tied head."""

    def __init__(
        self,
        vocab: int = VOCAB,
        d: int = 6,
        T: int = 5,
        hidden: int = 8,
        torch_layernorm: bool = False,
    ) -> None:
        super().__init__()
        LN = nn.LayerNorm if torch_layernorm else ManualLayerNorm
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.ln1 = LN(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = LN(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.lnf = LN(d)
        self.d = d

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        x = self.emb(idx) + self.pos[:T]
        q, k, v = self.qkv(self.ln1(x)).split(self.d, dim=-1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + self.proj(att @ v)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.lnf(x) @ self.emb.weight.T


class Linear(nn.Module):
    """logits = W x: J does not depend on θ."""

    def __init__(self, d_in: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.W = nn.Linear(d_in, classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.W(x)


def _perturb_layernorms(model: nn.Module) -> None:
    """Move LayerNorm affine params off (1, 0) so their curvature is generic."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm | ManualLayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))


Case = tuple[nn.Module, Callable[[Tensor, Tensor], Tensor], list[tuple[Tensor, Tensor]]]


def make_mlp() -> Case:
    torch.manual_seed(0)
    model = MLP().double()
    # unequal batch sizes: checks the token weighting of the mean loss
    batches = [
        (torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))),
        (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))),
    ]
    return model, ce, batches


def make_gpt(torch_layernorm: bool = False) -> Case:
    """The same parameters and data for either LayerNorm implementation."""
    torch.manual_seed(1)
    model = TinyGPT().double()
    _perturb_layernorms(model)
    batches = [
        (torch.randint(0, VOCAB, (3, 5)), torch.randint(0, VOCAB, (3, 5))),
        (torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))),
    ]
    if torch_layernorm:
        twin = TinyGPT(torch_layernorm=True).double()
        twin.load_state_dict(model.state_dict())
        model = twin
    return model, ce, batches


def make_linear() -> Case:
    torch.manual_seed(2)
    model = Linear().double()
    batches = [(torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,)))]
    return model, ce, batches


# ---------------------------------------------------------------------------------------------
# dense references, built independently of flatlm.sharpness
# ---------------------------------------------------------------------------------------------


def _flat_fn(
    model: nn.Module, names: Sequence[str]
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    params = dict(model.named_parameters())
    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    frozen = {n: p.detach() for n, p in params.items() if n not in names}

    def to_dict(theta: Tensor) -> dict[str, Tensor]:
        chunks = theta.split(sizes)
        return {
            **frozen,
            **{n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)},
        }

    return theta0, to_dict


def all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def dense_loss_fn(
    model: nn.Module, loss_fn: Callable, batches: list, names: Sequence[str] | None = None
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """θ ↦ mean loss over all targets (token-weighted over batches), and θ0."""
    names = list(names or all_names(model))
    theta0, to_dict = _flat_fn(model, names)
    total = sum(y.numel() for _, y in batches)

    def f(theta: Tensor) -> Tensor:
        d = to_dict(theta)
        return sum(
            loss_fn(functional_call(model, d, (x,)), y) * (y.numel() / total) for x, y in batches
        )

    return theta0, f


def dense_hessian(
    model: nn.Module, loss_fn: Callable, batches: list, names: Sequence[str] | None = None
) -> Tensor:
    theta0, f = dense_loss_fn(model, loss_fn, batches, names)
    H = hessian(f)(theta0)
    return (H + H.T) / 2


def dense_ggn(model: nn.Module, batches: list, names: Sequence[str] | None = None) -> Tensor:
    """Σ_rows J_rowᵀ (diag(p) − ppᵀ) J_row / N for mean softmax cross-entropy."""
    names = list(names or all_names(model))
    theta0, to_dict = _flat_fn(model, names)
    total = sum(y.numel() for _, y in batches)
    G = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    for x, _ in batches:

        def logits_fn(theta: Tensor, x: Tensor = x) -> Tensor:
            out = functional_call(model, to_dict(theta), (x,))
            return out.reshape(-1, out.shape[-1])

        J = jacrev(logits_fn)(theta0)  # (rows, V, n)
        p = logits_fn(theta0).softmax(-1).detach()
        H_l = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (rows, V, V)
        G += torch.einsum("rvn,rvw,rwm->nm", J, H_l, J) / total
    return (G + G.T) / 2


def dense_grad(
    model: nn.Module, loss_fn: Callable, batches: list, names: Sequence[str] | None = None
) -> Tensor:
    theta0, f = dense_loss_fn(model, loss_fn, batches, names)
    return torch.func.grad(f)(theta0)


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(model: nn.Module, snap: list[Tensor]) -> None:
    for p, s in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), s), "parameters changed"
        assert p.dtype == s.dtype


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@functools.cache
def dense_refs(name: str) -> dict[str, Tensor]:
    """Dense H, GN (all parameters) of a named case, computed once per session."""
    model, loss_fn, batches = {"mlp": make_mlp, "gpt": make_gpt, "linear": make_linear}[name]()
    H = dense_hessian(model, loss_fn, batches)
    G = dense_ggn(model, batches)
    return {"H": H, "G": G, "g": dense_grad(model, loss_fn, batches)}


CASES = {"mlp": make_mlp, "gpt": make_gpt, "linear": make_linear}
