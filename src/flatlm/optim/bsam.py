"""bSAM's own base optimizer (Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR
2023, Algorithm 1): the Adam-like update of the posterior mean θ with momentum m and the
per-element scale s (the posterior precision is N·s), and the weight noise e ~ N(0, 1/(N·s)).

The engine runs the passes (:class:`~flatlm.optim.methods.BSAM`): the clean pass at the noisy
point θ + e gives g, ε = ρ·g/s (the direction rule reads s through
:func:`bsam_preconditioner`), the perturbed pass gives g_ε, θ is copied back, then
:class:`BSAMBase` steps with g_ε in ``p.grad`` and g handed over in :attr:`BSAMBase.noisy_grads`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.preconditioners import register_preconditioner
from flatlm.optim.sharded import is_sharded, local

__all__ = ["BSAMBase", "bsam_preconditioner", "bsam_update", "noise_seed"]


def bsam_update(
    params: list[Tensor],
    grads: list[Tensor],
    noisy_grads: list[Tensor],
    momenta: list[Tensor],
    scales: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    damping: float,
) -> None:
    """One bSAM update in place (Algorithm 1, lines 8-10), in the paper's order:

    m ← β₁m + (1 − β₁)(g_ε + δθ);  s ← β₂s + (1 − β₂)(√s·|g| + δ + γ);  θ ← θ − α·m/s

    ``grads``: g_ε, the gradient at θ + ε; ``noisy_grads``: g, the gradient at θ + e.
    """
    if not params:
        return
    # √s·|g| + δ + γ with the s before this step: read s before it moves
    curvature = torch._foreach_sqrt(scales)
    torch._foreach_mul_(curvature, torch._foreach_abs(noisy_grads))
    torch._foreach_add_(curvature, weight_decay + damping)
    decayed = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
    torch._foreach_mul_(momenta, beta1)
    torch._foreach_add_(momenta, decayed, alpha=1.0 - beta1)
    torch._foreach_mul_(scales, beta2)
    torch._foreach_add_(scales, curvature, alpha=1.0 - beta2)
    torch._foreach_addcdiv_(params, momenta, scales, value=-lr)


def noise_seed(seed: int, draw: int) -> int:
    """The generator seed of draw number ``draw`` (one a fresh step): deterministic from
    ``(seed, draw)``, so a checkpoint needs only the count, and the same on every rank."""
    return ((seed & 0x7FFFFFFF) << 32) | (draw & 0xFFFFFFFF)


class BSAMBase(torch.optim.Optimizer):
    """bSAM's base optimizer: keeps the momentum m and the scale s of each parameter and draws
    the weight noise; built by :class:`~flatlm.optim.methods.BSAM` (its options pass through).

    ``num_data`` N: the number of training examples (the posterior precision is N·s, the noise
    variance 1/(N·s)). ``s0``: the initial scale. ``damping`` γ and ``weight_decay`` δ (the L2
    regulariser, also added to s) as in the paper. ``seed``: the noise's; draw t uses a
    generator seeded by :func:`noise_seed` (``seed``, t), t saved in each group as
    ``noise_draws``, so a resumed run draws what the uninterrupted one would.

    Run alone (no engine), ``step`` uses ``p.grad`` for both g and g_ε: bSAM with ρ = 0 and no
    noise.
    """

    def __init__(
        self,
        params: Any,
        num_data: int | None = None,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        damping: float = 0.1,
        s0: float = 1.0,
        seed: int = 0,
    ):
        check_options(num_data, lr, betas, weight_decay, damping, s0, seed)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "damping": damping,
            "s0": s0,
        }
        super().__init__(params, defaults)
        self.num_data = int(num_data)  # type: ignore[arg-type]
        self.seed = int(seed)
        for group in self.param_groups:
            group.setdefault("noise_draws", 0)
        #: g per parameter (local shards) for the next ``step``, set by the engine around it.
        self.noisy_grads: dict[Tensor, Tensor] = {}

    def _state_of(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:  # zeros_like/full_like of a DTensor is sharded like it
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["scale"] = torch.full_like(p, group["s0"], memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Every parameter's state at its value before a first step (m = 0, s = s0), changing
        nothing else: what ``torch.distributed.checkpoint``'s state initialisation needs
        (a zero step at lr 0 would move s)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, noisy, momenta, scales = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p, group)
                params.append(local(p))
                grads.append(local(p.grad))
                noisy.append(self.noisy_grads.get(p, grads[-1]))
                momenta.append(local(state["momentum"]))
                scales.append(local(state["scale"]))
            beta1, beta2 = group["betas"]
            bsam_update(
                params,
                grads,
                noisy,
                momenta,
                scales,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                weight_decay=float(group["weight_decay"]),
                damping=float(group["damping"]),
            )
        return loss

    @torch.no_grad()
    def scales(self, params: list[Tensor]) -> list[Tensor]:
        """s per parameter (local shards, as ``params``) as it stands before this step: its own
        tensor where there is state (read it, never write), else s0."""
        by_shard = {local(p): (p, g) for g in self.param_groups for p in g["params"]}
        out = []
        for shard in params:
            p, group = by_shard[shard]
            state = self.state.get(p)
            out.append(local(state["scale"]) if state else torch.full_like(shard, group["s0"]))
        return out

    @torch.no_grad()
    def draw_noise(self, params: list[Tensor]) -> list[Tensor]:
        """e ~ N(0, 1/(N·s)) per parameter of ``params`` (local shards of them under FSDP2),
        from this draw's own generator on the parameters' device; counts the draw.

        Every rank draws each whole tensor in the groups' order and keeps its own rows, so
        replicated parameters get the same noise on every rank and sharded ones the rows one
        process would give them."""
        first = self.param_groups[0]
        draw = int(first["noise_draws"])
        for group in self.param_groups:
            group["noise_draws"] = draw + 1
        if not params:
            return []
        device = local(params[0]).device
        generator = torch.Generator(device=device).manual_seed(noise_seed(self.seed, draw))
        wanted = set(params)
        noise = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p not in wanted:
                    continue
                whole = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=device)
                noise[p] = _rows_of(whole, p)
        shards = [local(p) for p in params]
        std = torch._foreach_mul(self.scales(shards), float(self.num_data))
        torch._foreach_rsqrt_(std)
        return torch._foreach_mul([noise[p] for p in params], std)


def _rows_of(whole: Tensor, p: Tensor) -> Tensor:
    """This rank's part of a tensor of ``p``'s full shape (all of it unless ``p`` is sharded)."""
    if not is_sharded(p):
        return whole
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        p.shape,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
    )
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return whole[index].contiguous()


def check_options(
    num_data: Any,
    lr: float,
    betas: Any,
    weight_decay: float,
    damping: float,
    s0: float,
    seed: Any,
) -> None:
    """One-line errors naming the fix, before anything is built."""
    if num_data is None:
        raise ValueError(
            "bsam needs num_data=N, the number of training examples, tokens for a language "
            "model's per-token mean loss (the noise variance is 1/(N·s)): e.g. "
            "'bsam:num_data=50000' or BSAM(params, num_data=len(train_set))"
        )
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data <= 0:
        raise ValueError(
            f"num_data must be a whole number > 0 (training examples), got {num_data!r}"
        )
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if len(tuple(betas)) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if not (math.isfinite(s0) and s0 > 0):
        raise ValueError(f"s0 (the initial scale) must be a finite number > 0, got {s0!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")


def bsam_preconditioner(
    base: torch.optim.Optimizer, params: list[Tensor], grads: list[Tensor] | None = None
) -> list[Tensor | None]:
    """P = s, the scale before this step, with or without ``grads`` (bSAM's ε = ρ·g/s uses the
    s the noise was drawn with); s0 where a parameter has no state yet."""
    assert isinstance(base, BSAMBase)
    return list(base.scales(params))


register_preconditioner(BSAMBase, bsam_preconditioner)
