"""Moving θ to θ + ε and back: gathering by group, the clean copy, ascent, exact restore.

θ is always restored from a copy, never by subtracting ε, so the base optimizer steps from
exactly θ. With ``perturb_every > 1`` the unit direction δ (ε = ρ·δ) of each fresh step is kept
in the optimizer's ``state`` as ``"perturb_direction"``, so the steps in between can reuse it
and a checkpoint carries it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flatlm.optim.directions import Direction, Prepared, global_norm
from flatlm.optim.preconditioners import BaseGeometry
from flatlm.optim.sharded import like_param, local, local_state, locals_of
from flatlm.optim.validation import check_dense, check_group_rhos

__all__ = ["Gathered", "Perturbation", "inverse_norm"]

STORED = "perturb_direction"
#: Every policy's per-parameter stored tensor (flatlm.optim.policies: ``StepPolicy.stored``).
STORED_KEYS = (STORED, "looksam_gv")
State = MutableMapping[Tensor, dict[str, Any]]
#: ``noise_of(params) -> e`` per parameter, as local shards (``BSAMBase.draw_noise``).
NoiseSource = Callable[[list[Tensor]], list[Tensor]]


def inverse_norm(norm: Tensor) -> Tensor:
    """1/‖n‖ in at least float32, with ‖n‖ = 0 giving a finite value (then u = 0, so ε = 0).

    A floor instead of the usual ``+ 1e-12``: adding shrinks ε by 1e-12/‖n‖ relative, which is
    not negligible when gradients are small.
    """
    norm = norm.to(torch.promote_types(norm.dtype, torch.float32))
    return 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _forget_autocast_copies() -> None:
    """θ moved in place: under ``torch.autocast`` (cache on, its default) the low-precision
    copies of the weights made at the old θ would be reused by the next pass."""
    torch.clear_autocast_cache()


def _has_grad(p: Tensor) -> bool:
    return p.grad is not None


@dataclass
class Gathered:
    """The selected parameters, flat, and each group's [start, end) and ρ.

    ``params`` are the parameters themselves (the keys of every state); ``shards`` the tensors
    the maths runs on: the same tensors, or this rank's shards of FSDP2's DTensors.
    """

    params: list[Tensor]
    slices: list[tuple[int, int, float]]

    @property
    def shards(self) -> list[Tensor]:
        return locals_of(self.params)

    @classmethod
    def of(
        cls, groups: list[dict[str, Any]], include: Callable[[Tensor], bool] = _has_grad
    ) -> Gathered:
        """The parameters ``include`` selects (by default those with a gradient), grouped like
        ``groups``, with each group's current ρ."""
        params: list[Tensor] = []
        slices: list[tuple[int, int, float]] = []
        for g in groups:
            start = len(params)
            params.extend(p for p in g["params"] if include(p))
            slices.append((start, len(params), g["rho"]))
        return cls(params, slices)

    def scale_(self, u: list[Tensor], factor: Tensor | float) -> list[Tensor]:
        """u ← ρ_group · factor · u in place, one foreach call per parameter group."""
        for start, end, rho in self.slices:
            if end > start:
                torch._foreach_mul_(u[start:end], factor * rho)
        return u


class Perturbation:
    """One step's perturbation: where θ was, the rule's prepared geometry, the ascent so far."""

    def __init__(
        self,
        direction: Direction,
        geometry: BaseGeometry,
        *,
        ascent_steps: int,
        keep_direction: bool,
    ):
        self.direction = direction
        self.geometry = geometry
        self.ascent_steps = ascent_steps
        self.keep_direction = keep_direction  # perturb_every > 1
        # Not in the optimizer's state: the clean copies are scratch, never saved.
        self.clean_copies: dict[Tensor, Tensor] = {}
        self.active: Gathered | None = None
        self.prepared: Prepared | None = None
        self.clean_ok: Tensor | None = None
        self._delta: list[Tensor] | None = None
        self._prepared_params: list[Tensor] = []
        # ‖ε‖ of the last fresh perturbation, for logging: one extra norm per step, so opt-in.
        self.record_norm = False
        self.last_norm: Tensor | None = None

    # --- one step ---------------------------------------------------------------------------

    @torch.no_grad()
    def ascend(self, groups: list[dict[str, Any]], state: State, first: bool) -> None:
        """θ → (the next) perturbed point from the gradients now in ``p.grad``."""
        if first:
            if self.active is not None:  # a previous first step was never completed
                self.restore()
            gathered, grads = self._inputs(groups, copy=False)
            check_dense(gathered.params)
            self.active = gathered
            self._store_clean(gathered.params)
            self._delta = None
        gathered = self.active
        assert gathered is not None
        params = gathered.shards
        if not first:  # the next ascent step, from the gradient at the current perturbed point
            grads = [
                local(p.grad) if p.grad is not None else torch.zeros_like(shard)
                for p, shard in zip(gathered.params, params, strict=True)
            ]
        check_group_rhos(groups)
        if first:
            self.prepared = self.direction.prepare(
                params, grads, _rule_state(state, gathered.params), self.geometry
            )
            self._prepared_params = gathered.params
        assert self.prepared is not None
        u, n = self.direction(params, grads, self.prepared)
        norm = global_norm(n)
        if first:
            self.clean_ok = torch.isfinite(norm)
            if self.keep_direction:
                self.drop_stored(state, keep=params)

        if self.ascent_steps == 1:
            factor: Tensor | float = inverse_norm(norm) if self.direction.to_radius else 1.0
            if self.keep_direction:  # keep the unit direction δ for the steps in between
                torch._foreach_mul_(u, factor)
                torch._foreach_copy_(self.stored(state, gathered.params), u)
                factor = 1.0
            self._add(params, gathered.scale_(u, factor))
            return
        # Multi-step: δ (ε = ρ·δ per group) accumulates K steps of length 1/K, each measured in
        # the set's own norm (‖u ⊘ T‖/‖n‖ = 1 for a scaled rule, ‖u‖/‖n‖ = 1 otherwise), so δ
        # stays in the unit set by the triangle inequality: no projection is needed.
        torch._foreach_mul_(u, inverse_norm(norm) / self.ascent_steps)  # u is scratch here
        if self._delta is None:
            self._delta = [torch.zeros_like(p) for p in params]
        delta = self._delta
        torch._foreach_add_(delta, u)
        torch._foreach_copy_(params, self._clean_list(gathered.params))
        if self.keep_direction:
            torch._foreach_copy_(self.stored(state, gathered.params), delta)
        self._add(params, gathered.scale_(torch._foreach_mul(delta, 1.0), 1.0))

    def _add(self, params: list[Tensor], eps: list[Tensor]) -> None:
        """θ += ε (on the shards), keeping ‖ε‖ (a tensor, no sync) when ``record_norm`` asks for it."""
        if self.record_norm:
            self.last_norm = global_norm(eps)
        if params:  # none: nothing to perturb yet (a momentum rule's first step)
            torch._foreach_add_(params, eps)
        _forget_autocast_copies()

    @torch.no_grad()
    def shift(self, groups: list[dict[str, Any]], noise_of: NoiseSource) -> None:
        """θ → θ + e before the clean pass (bSAM's noisy point), e = ``noise_of(params)`` for
        every parameter that requires grad; :meth:`restore` copies θ back."""
        if self.active is not None:
            self.restore()
        gathered = Gathered.of(groups, lambda p: p.requires_grad)
        check_dense(gathered.params)
        self._store_clean(gathered.params)
        self.active = gathered
        if gathered.params:
            torch._foreach_add_(gathered.shards, noise_of(gathered.params))
        _forget_autocast_copies()

    @torch.no_grad()
    def ascend_stored(self, groups: list[dict[str, Any]], state: State) -> None:
        """θ → θ + ρ·δ with the stored δ and each group's current ρ (θ kept for the restore)."""
        check_group_rhos(groups)
        gathered = Gathered.of(groups, lambda p: STORED in state.get(p, {}))
        self.prepared = None
        self._delta = None
        self._store_clean(gathered.params)
        self.active = gathered
        device = gathered.params[0].device if gathered.params else torch.device("cpu")
        self.clean_ok = torch.ones((), dtype=torch.bool, device=device)
        directions = self.stored(state, gathered.params)
        shards = gathered.shards
        for start, end, rho in gathered.slices:
            if end > start:
                torch._foreach_add_(shards[start:end], directions[start:end], alpha=rho)
        _forget_autocast_copies()

    @torch.no_grad()
    def restore(self) -> None:
        """θ copied back bit for bit."""
        gathered = self.active
        assert gathered is not None
        if gathered.params:
            torch._foreach_copy_(gathered.shards, self._clean_list(gathered.params))
        self.active = None
        _forget_autocast_copies()

    def abort(self) -> None:
        """Undo a started step (θ back, nothing kept); a no-op when none is under way."""
        if self.active is not None:
            self.restore()
        self.prepared = None
        self._delta = None

    def finish(self, state: State, taken: bool) -> None:
        """End the step: a taken step saves the rule's new state; a skipped one forgets it."""
        prepared, self.prepared, self._delta = self.prepared, None, None
        if not taken or prepared is None or prepared.new_state is None:
            return
        for key, values in prepared.new_state.items():
            for p, value in zip(self._prepared_params, values, strict=True):
                state[p][key] = like_param(value, p)

    def extra_bytes(self, state: State) -> int:
        """Bytes held between steps beyond the base optimizer's state: the clean copy of θ and
        ``state`` (the rule's and the policy's tensors); this rank's shards under FSDP2."""
        tensors = [*self.clean_copies.values()]
        tensors += [local(t) for st in state.values() for t in st.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # --- without moving θ ------------------------------------------------------------------

    @torch.no_grad()
    def epsilon(self, groups: list[dict[str, Any]], state: State) -> dict[Tensor, Tensor]:
        """ε per parameter with a gradient, from the gradients now in ``p.grad``; changes
        nothing."""
        gathered, grads = self._inputs(groups, copy=True)
        shards = gathered.shards
        prepared = self.direction.prepare(
            shards, grads, _rule_state(state, gathered.params), self.geometry
        )
        u, n = self.direction(shards, grads, prepared)
        factor = inverse_norm(global_norm(n)) if self.direction.to_radius else 1.0
        eps = gathered.scale_(u, factor)
        return {p: like_param(e, p) for p, e in zip(gathered.params, eps, strict=True)}

    def _inputs(self, groups: list[dict[str, Any]], copy: bool) -> tuple[Gathered, list[Tensor]]:
        """The parameters ε is made for and the rule's input for each: the clean gradient
        (a copy if ``copy``: the rule may overwrite it), or a momentum rule's own source; local
        shards under FSDP2."""
        if self.direction.needs_gradient:
            gathered = Gathered.of(groups)
            grads = [local(p.grad) for p in gathered.params]  # type: ignore[arg-type]
            return gathered, torch._foreach_mul(grads, 1.0) if copy and grads else grads
        every = [p for g in groups for p in g["params"]]
        sources = self.direction.source(locals_of(every), self.geometry)
        source = dict(zip(every, sources, strict=True))
        gathered = Gathered.of(groups, lambda p: source[p] is not None)
        return gathered, [source[p] for p in gathered.params]  # type: ignore[misc]

    # --- perturb_every's stored directions ---------------------------------------------------

    @staticmethod
    def drop_stored(state: State, keep: Iterable[Tensor] = ()) -> None:
        """Forget δ of every parameter not in ``keep``: a fresh step without a gradient for a
        parameter gave it ε = 0, and the steps that reuse this perturbation must too."""
        kept = set(keep)
        for p, st in state.items():
            if p not in kept:
                st.pop(STORED, None)

    @staticmethod
    def drop_other_stored(state: State, key: str | None) -> None:
        """Forget every policy's stored tensor but ``key``'s (a checkpoint of another policy)."""
        for st in state.values():
            for other in STORED_KEYS:
                if other != key:
                    st.pop(other, None)

    @staticmethod
    def stored(state: State, params: list[Tensor], key: str = STORED) -> list[Tensor]:
        """A policy's stored tensor per parameter (δ with ε = ρ·δ by default) as local shards,
        allocated as zeros on first use (sharded like the parameter); kept in ``state`` for
        checkpoints."""
        for p in params:
            st = state[p]
            if key not in st:
                st[key] = like_param(torch.zeros_like(local(p)), p)
        return [local(state[p][key]) for p in params]

    # --- the clean copy --------------------------------------------------------------------

    def _store_clean(self, params: list[Tensor]) -> None:
        if params:
            torch._foreach_copy_(self._clean_list(params), locals_of(params))

    def _clean_list(self, params: list[Tensor]) -> list[Tensor]:
        """The clean copy of each parameter (of this rank's shard under FSDP2)."""
        copies = self.clean_copies
        for p in params:
            if p not in copies:
                copies[p] = torch.empty_like(local(p), memory_format=torch.preserve_format)
        return [copies[p] for p in params]


def _rule_state(state: State, params: list[Tensor]) -> list[Any]:
    """What a rule reads of its saved state, per parameter, as local shards."""
    return [local_state(state.get(p, {})) for p in params]
