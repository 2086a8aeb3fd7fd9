"""Small models, a spy base optimizer and reference maths shared by the optimizer tests."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from flatlm.optim import METHODS, BSAMBase

#: bSAM needs the number of training examples (its noise variance is 1/(N·s)).
BSAM = "bsam:num_data=64"
#: Every sharpness-aware method by short name (bsam as a spec with its required num_data).
SAM_METHODS = [BSAM if m == "bsam" else m for m in METHODS if m != "adamw"]
#: The methods that step with their own base optimizer (base_optimizer= is refused).
OWN_BASE_METHODS = [BSAM]
#: The one-pass methods: ε along the base optimizer's momentum, no clean backward.
MOMENTUM_METHODS = ["msam", "mfsam", "mpfsam"]
#: The methods that make ε from a clean gradient (two gradient passes a step).
GRADIENT_METHODS = [m for m in SAM_METHODS if m not in MOMENTUM_METHODS]
#: The methods whose update combines the clean and perturbed gradients (no perturb_every).
COMBINING_METHODS = ["wsam", "gsam", BSAM]


def forward_calls(name: str) -> int:
    """forward() calls per step: msam runs only the perturbed pass."""
    return 1 if name == "msam" else 2


#: (method, forward call to poison) for every pass a method runs.
POISON_CASES = [(n, call) for n in SAM_METHODS for call in range(forward_calls(n))]
#: (method, perturb_every) for the values each method accepts.
PERTURB_EVERY_CASES = [
    (n, k)
    for n in SAM_METHODS
    for k in (1, 2)
    if k == 1 or (n in GRADIENT_METHODS and n not in COMBINING_METHODS)
]


class TinyMLP(nn.Module):
    """Two layers with a tanh: J depends on θ, so Functional-SAM differs from SAM here."""

    def __init__(self, d_in: int = 5, d_hidden: int = 7, n_out: int = 4, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, n_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def make_mlp(seed: int = 0, dtype=torch.float64, **kw) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kw).to(dtype)


def make_batch(seed: int = 1, n: int = 16, d_in: int = 5, n_out: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_out, (n,), generator=g)
    return x, y


def ce(y: torch.Tensor):
    return lambda logits: F.cross_entropy(logits, y)


def make_spy(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """A subclass of ``base`` that records the parameters and gradients it steps with."""

    class Spy(base):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            self.seen_params: list[list[torch.Tensor]] = []
            self.seen_grads: list[list[torch.Tensor | None]] = []

        @torch.no_grad()
        def step(self, closure=None):
            ps = [p for g in self.param_groups for p in g["params"]]
            self.seen_params.append([p.detach().clone() for p in ps])
            self.seen_grads.append([None if p.grad is None else p.grad.clone() for p in ps])
            return super().step(closure)

    Spy.__name__ = f"Spy{base.__name__}"
    return Spy


SpySGD = make_spy(torch.optim.SGD)
SpyAdamW = make_spy(torch.optim.AdamW)
SpyBSAMBase = make_spy(BSAMBase)


def spy_base(name: str) -> type[torch.optim.Optimizer]:
    """The spy base optimizer a test builds ``name`` over: AdamW's, or bsam's own base's."""
    return SpyBSAMBase if name in OWN_BASE_METHODS else SpyAdamW


def poisoned_forward(model: nn.Module, x: torch.Tensor, bad_call: int, value: float = float("nan")):
    """forward() whose logits are multiplied by ``value`` (NaN, inf) on call number ``bad_call``
    (0 the clean pass, 1 the perturbed one)."""
    calls = {"n": 0}

    def forward() -> torch.Tensor:
        out = model(x)
        if calls["n"] == bad_call:
            out = out * value
        calls["n"] += 1
        return out

    return forward


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x - y).abs().max()


# --- independent references (plain torch on lists of tensors, written from docs/algorithms.md) ---


def flat_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖·‖ of a list of tensors seen as one vector: √(Σ x²), in plain torch."""
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def adam_preconditioner_reference(
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor | None,
    step: float,
    *,
    beta2: float,
    eps: float,
    current_moment: bool,
) -> torch.Tensor:
    """Adam's P = √v̂ + eps for one parameter, from its stored second moment v at step count t.

    ``current_moment=True`` (ALGORITHMS.md's form, PSAM's default ``moment="current"``): this
    step's gradient folded in, v' = β₂v + (1 − β₂)g², bias-corrected for step t + 1, with v = 0
    and t = 0 where AdamW has no state yet (so P = |g| + eps there).
    ``current_moment=False`` (``moment="previous"``, flatlm's rule before 0.2): v̂ = v / (1 − β₂ᵗ)
    from the state as AdamW left it after its last step; P = 1 while AdamW has no state.
    """
    if current_moment:
        v = torch.zeros_like(grad) if exp_avg_sq is None else exp_avg_sq
        v_new = beta2 * v + (1 - beta2) * grad * grad
        return torch.sqrt(v_new / (1 - beta2 ** (step + 1))) + eps
    if exp_avg_sq is None:
        return torch.ones_like(grad)
    return torch.sqrt(exp_avg_sq / (1 - beta2**step)) + eps


class GasamReference:
    """GA-SAM as flatlm formulates it (docs/algorithms.md), in plain torch, with its own state.

    Per step: the EMA of g² (β, bias-corrected with the step count t) gives s, ŝ = s/RMS(s) (RMS
    over all elements of all tensors), D = clip((ŝ + ξ)^α, 1/c, c) (``normalize=False``: times
    clip(RMS(s)^α, 1/c, c)); then K ascent steps: δ ← δ + D²g_k / (K‖n_k‖), g_k the gradient at
    the current point (g_0 the clean one), n_k = D²g_k (``radius="euclidean"``) or D g_k
    (``"ellipsoid"``), δ projected radially onto the unit set (‖δ‖ ≤ 1, or ‖δ ⊘ D‖ ≤ 1), the
    point θ + ρδ; the descent gradient is the one at the last point. ``clean_grad_scale``
    multiplies the clean gradient the state and D are made from (to model an implementation
    that forgets a weight).
    """

    def __init__(
        self,
        rho: float,
        *,
        alpha: float = -1.0,
        beta: float = 0.99,
        normalize: bool = True,
        ascent_steps: int = 1,
        xi: float = 1e-12,
        max_scale: float = 100.0,
        radius: str = "euclidean",
        clean_grad_scale: float = 1.0,
    ):
        assert radius in ("euclidean", "ellipsoid")
        self.rho, self.alpha, self.beta, self.normalize = rho, alpha, beta, normalize
        self.radius = radius
        self.ascent_steps, self.xi, self.max_scale = ascent_steps, xi, max_scale
        self.clean_grad_scale = clean_grad_scale
        self.ema: list[torch.Tensor] | None = None
        self.t = 0
        self.clipped = 0  # how many elements of D the clip changed, over all steps (a sanity aid)

    def scale(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """D from the EMA with ``grads`` folded in (and kept: the step is assumed taken)."""
        beta, c = self.beta, self.max_scale
        old = self.ema if self.ema is not None else [torch.zeros_like(g) for g in grads]
        self.ema = [beta * e + (1 - beta) * g * g for e, g in zip(old, grads, strict=True)]
        self.t += 1
        s = [torch.sqrt(e / (1 - beta**self.t)) for e in self.ema]
        rms = torch.sqrt(sum((x * x).sum() for x in s) / sum(x.numel() for x in s))
        raw = [(x / rms + self.xi) ** self.alpha for x in s]
        d = [r.clamp(1 / c, c) for r in raw]
        self.clipped += sum(int((r != di).sum()) for r, di in zip(raw, d, strict=True))
        if not self.normalize:
            d = [di * (rms**self.alpha).clamp(1 / c, c) for di in d]
        return d

    def step(self, theta: list[torch.Tensor], grad_at) -> tuple[list[torch.Tensor], list[list]]:
        """(descent gradient, [ε after each ascent step]); ``grad_at(point) -> gradients``."""
        k_steps = self.ascent_steps
        g = grad_at(theta)
        d = self.scale([self.clean_grad_scale * gi for gi in g])
        delta = [torch.zeros_like(t) for t in theta]
        epsilons = []
        ellipsoid = self.radius == "ellipsoid"
        for _ in range(k_steps):
            u = [di * di * gi for di, gi in zip(d, g, strict=True)]
            norm = flat_norm([di * gi for di, gi in zip(d, g, strict=True)] if ellipsoid else u)
            delta = [dl + ui / (k_steps * norm) for dl, ui in zip(delta, u, strict=True)]
            # the radial projection onto the unit set: ‖δ ⊘ D‖ ≤ 1, or the ball ‖δ‖ ≤ 1
            size = flat_norm(
                [dl / di for dl, di in zip(delta, d, strict=True)] if ellipsoid else delta
            )
            if size > 1:
                delta = [dl / size for dl in delta]
            eps = [self.rho * dl for dl in delta]
            epsilons.append(eps)
            g = grad_at([t + e for t, e in zip(theta, eps, strict=True)])
        return g, epsilons


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of every tensor of a flatlm optimizer's state dict (base and method state)."""
    sd = opt.state_dict()  # torch's layout: the base's and the method's state in each entry
    return [t.clone() for s in sd["state"].values() for t in s.values() if torch.is_tensor(t)]


class OverflowHook:
    """A forward hook that makes the given forward calls (1-based) non-finite (× inf)."""

    def __init__(self, calls: set[int]):
        self.calls, self.count = calls, 0

    def __call__(self, module, args, output):
        self.count += 1
        return output * float("inf") if self.count in self.calls else None


#: A Lightning ``Trainer``'s keyword arguments for tests: one CPU device, nothing written or shown.
QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def step_all(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    """One engine step (single-call protocol) per (x, y) batch."""
    for x, y in batches:
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))


def check_resume_mid_training(make_model, make_opt, batches, split: int, *, global_rng=False):
    """Train ``make_opt(model)`` over every batch; and, from the ``state_dict`` saved after
    ``split`` batches, a fresh optimizer (over a fresh model holding the parameters of that
    moment) over the rest: parameters and every state tensor must be bit-identical (with
    ``global_rng`` torch's RNG is restored too, for dropout). Returns both optimizers for the
    caller's own checks."""
    model = make_model(0)
    opt = make_opt(model)
    step_all(model, opt, batches[:split])
    saved = copy.deepcopy(opt.state_dict())  # the live state keeps changing
    theta, rng = params_of(model), torch.get_rng_state()
    step_all(model, opt, batches[split:])

    resumed_model = make_model(3)
    with torch.no_grad():
        for p, v in zip(resumed_model.parameters(), theta, strict=True):
            p.copy_(v)
    resumed = make_opt(resumed_model)
    resumed.load_state_dict(saved)
    if global_rng:
        torch.set_rng_state(rng)
    step_all(resumed_model, resumed, batches[split:])
    assert_bitwise_equal(params_of(resumed_model), params_of(model))
    assert_bitwise_equal(state_tensors(resumed), state_tensors(opt))
    return opt, resumed


# The float64 references' maths on {name: tensor} dicts (torch.func: no optimizer involved).


def grad_at(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """∇ of the cross-entropy at the parameters ``params`` (a {name: tensor} dict)."""
    return grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)


def dict_norm(g: dict) -> float:
    return math.sqrt(sum(float((v**2).sum()) for v in g.values()))


def dict_dot(a: dict, b: dict) -> float:
    return sum(float((a[n] * b[n]).sum()) for n in a)
