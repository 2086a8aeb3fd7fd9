"""Mutation check of the optimizer tests: plant one small bug at a time, expect named tests to fail.

Each mutation is an exact edit of one source line (or a few) in ``src/flatlm/optim`` and the test
files that must catch it. For each, the source tree is copied to a temporary folder, the edit is
applied there (the edit's text must occur exactly once, so a refactor that moves the code makes
the mutation fail loudly instead of silently testing nothing), and the named tests run against
the copy. A mutation the tests do not catch "survives": a gap in the tests.

    python scripts/mutation_check.py            # all mutations, about 3-5 min on 2 cores
    python scripts/mutation_check.py restore    # the mutations whose name contains "restore"

Exit code 0 when every mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPTIM = "src/flatlm/optim"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files expected to fail


MUTATIONS = [
    Mutation(
        "fsdp: norms over this rank's shard only",
        f"{OPTIM}/sharded.py",
        "    total = partial.clone()\n",
        "    return partial\n    total = partial.clone()\n",
        ("tests/optim/test_fsdp.py",),
    ),
    Mutation(
        "fsdp: a rank's non-finite loss not shared with the others",
        f"{OPTIM}/sharded.py",
        'partial = partial + torch.where(ok.to(device), 0.0, float("inf"))',
        "partial = partial",
        ("tests/optim/test_fsdp.py::test_a_nan_on_one_rank_skips_the_step_on_every_rank",),
    ),
    Mutation(
        "momentum: ε along +m instead of MSAM's −m",
        f"{OPTIM}/directions.py",
        "negated = iter(torch._foreach_neg(present) if present else [])",
        "negated = iter(torch._foreach_mul(present, 1.0) if present else [])",
        ("tests/optim/test_momentum.py",),
    ),
    Mutation(
        "momentum: mpfsam's preconditioner dropped",
        f"{OPTIM}/directions.py",
        "        return Prepared(precond=geometry.preconditioner(params, None))",
        "        return Prepared()",
        ("tests/optim/test_momentum.py",),
    ),
    Mutation(
        "functional: r(θ+ε) instead of the clean r(θ)",
        f"{OPTIM}/passes.py",
        "        if record.dlogits is not None:\n            vjp(",
        "        if False:\n            vjp(",
        ("tests/optim/test_functional.py",),
    ),
    Mutation(
        "restore: θ left perturbed",
        f"{OPTIM}/perturbation.py",
        "            torch._foreach_copy_(gathered.shards, self._clean_list(gathered.params))",
        "            pass",
        ("tests/optim/test_engine.py",),
    ),
    Mutation(
        "restore by subtracting ε instead of copying θ back",
        f"{OPTIM}/perturbation.py",
        "            torch._foreach_copy_(gathered.shards, self._clean_list(gathered.params))",
        "            torch._foreach_sub_(gathered.shards, torch._foreach_sub(gathered.shards,"
        " self._clean_list(gathered.params)))",
        ("tests/optim/test_engine.py",),
    ),
    Mutation(
        "bias corrections dropped",
        f"{OPTIM}/preconditioners.py",
        "    return list((1.0 - torch.pow(beta, t)).unbind())",
        "    return list(torch.ones_like(t).unbind())",
        ("tests/optim/test_functional.py", "tests/optim/test_references.py"),
    ),
    Mutation(
        "√(v̂ + eps) instead of √v̂ + eps",
        f"{OPTIM}/preconditioners.py",
        "        torch._foreach_sqrt_(precond)\n        torch._foreach_add_(precond, eps)",
        "        torch._foreach_add_(precond, eps)\n        torch._foreach_sqrt_(precond)",
        ("tests/optim/test_functional.py", "tests/optim/test_references.py"),
    ),
    Mutation(
        "preconditioner: the previous moment where this step's is the default",
        f"{OPTIM}/directions.py",
        '        current = grads if self.moment == "current" else None',
        "        current = None",
        ("tests/optim/test_preconditioner_fidelity.py", "tests/optim/test_functional.py"),
    ),
    Mutation(
        "scaled rule: g instead of T²g",
        f"{OPTIM}/directions.py",
        "        u = torch._foreach_mul(grads, prepared.scale)  # T² g",
        "        u = grads  # T² g",
        ("tests/optim/test_gasam.py", "tests/optim/test_asam.py"),
    ),
    Mutation(
        "GA-SAM: the Euclidean radius ignored",
        f"{OPTIM}/directions.py",
        '        return (u, grads) if self.radius == "ellipsoid" else (u, u)',
        "        return u, grads",
        ("tests/optim/test_gasam.py", "tests/optim/test_references.py"),
    ),
    Mutation(
        "ASAM: every tensor scaled, not only the weights",
        f"{OPTIM}/directions.py",
        "        if self.is_weight is None:",
        "        if True:",
        ("tests/optim/test_asam.py",),
    ),
    Mutation(
        "no RNG replay for the perturbed pass",
        f"{OPTIM}/passes.py",
        "        if record.rng is not None:\n            record.rng.restore()",
        "        pass",
        ("tests/optim/test_engine.py",),
    ),
    Mutation(
        "a rule's state (GA-SAM's EMA) saved on a skipped step",
        f"{OPTIM}/perturbation.py",
        "        if not taken or prepared is None or prepared.new_state is None:",
        "        if prepared is None or prepared.new_state is None:",
        ("tests/optim/test_engine.py", "tests/optim/test_gasam.py"),
    ),
    Mutation(
        "unweighted clean micro-batch losses",
        f"{OPTIM}/passes.py",
        "        return CleanPass([Recorded(None, None)] * len(micro), None, None)\n"
        "    weight = 1.0 / len(micro)",
        "        return CleanPass([Recorded(None, None)] * len(micro), None, None)\n"
        "    weight = 1.0",
        ("tests/optim/test_accumulation.py",),
    ),
    Mutation(
        "ε from the last micro-batch's gradient only",
        f"{OPTIM}/engine.py",
        "        self._graph_checked |= self.functional and not one_pass\n",
        "        self._graph_checked |= self.functional and not one_pass\n"
        "        self.zero_grad(set_to_none=True)\n"
        "        passes.clean_pass(micro[-1:], functional=False, scaler=scaler, rng_devices=None)\n",
        ("tests/optim/test_accumulation.py",),
    ),
    Mutation(
        "perturb_every: the stored direction not scaled by the current ρ",
        f"{OPTIM}/perturbation.py",
        "directions[start:end], alpha=rho)",
        "directions[start:end], alpha=1.0)",
        ("tests/optim/test_perturb_every.py",),
    ),
    Mutation(
        "aux loss: its gradient dropped from the functional pass",
        f"{OPTIM}/passes.py",
        "    torch.autograd.backward([logits, aux], [dlogits.to(logits.dtype), torch.ones_like(aux)])",
        "    logits.backward(dlogits.to(logits.dtype))",
        ("tests/optim/test_aux_loss.py",),
    ),
    Mutation(
        "clipping the clean gradient instead of the perturbed one (no clipping at the step)",
        f"{OPTIM}/sharded.py",
        "        if max_norm is not None:\n            return torch.nn.utils.clip_grad_norm_(",
        "        if False:\n            return torch.nn.utils.clip_grad_norm_(",
        ("tests/optim/test_sam.py",),
    ),
    Mutation(
        "the non-finite skip ignores the perturbed pass",
        f"{OPTIM}/engine.py",
        "        ok = perturbation.clean_ok if ok is None else perturbation.clean_ok & ok",
        "        ok = perturbation.clean_ok",
        ("tests/optim/test_engine.py",),
    ),
    # An independent review's survivors (issue 29), each now caught by a test against a value
    # computed without the code under test.
    Mutation(
        "state layout: the skipped-step count read as 0",
        f"{OPTIM}/state_layout.py",
        '            int(first.get(PREFIX + "skipped_steps") or 0),',
        "            0,",
        (
            "tests/optim/test_state_layout.py",
            "tests/reliability/test_divergence.py::test_skipped_steps_are_counted_across_a_resume",
        ),
    ),
    Mutation(
        "state layout (flatlm 0.2's): the skipped-step count read as 0",
        f"{OPTIM}/state_layout.py",
        '                int(state_dict.get("skipped_steps") or 0),',
        "                0,",
        ("tests/optim/test_state_layout.py",),
    ),
    Mutation(
        "amsgrad: this step's moment started from the running maximum instead of v",
        f"{OPTIM}/preconditioners.py",
        '            second_moments.append(local(state["exp_avg_sq" if grads is not None else key]))',
        "            second_moments.append(local(state[key]))",
        ("tests/optim/test_functional.py",),
    ),
    Mutation(
        "fsdp: the clipping coefficient not clamped at 1 (small gradients scaled up)",
        f"{OPTIM}/sharded.py",
        "        coef = (max_norm / (grad_norm + 1e-6)).clamp(max=1.0)",
        "        coef = max_norm / (grad_norm + 1e-6)",
        ("tests/optim/test_fsdp.py::test_a_max_grad_norm_above_the_gradient_norm_changes_nothing",),
    ),
    Mutation(
        "hutchinson: the stderr's standard deviation divided by n instead of n − 1",
        "src/flatlm/sharpness/solvers.py",
        "    se = float(samples.std(unbiased=True) / math.sqrt(num_samples))",
        "    se = float(samples.std(unbiased=False) / math.sqrt(num_samples))",
        ("tests/sharpness/test_sharpness_spectra.py",),
    ),
    Mutation(
        "hutch++: the stderr's standard deviation divided by n instead of n − 1",
        "src/flatlm/sharpness/solvers.py",
        "    se = float(samples.std(unbiased=True) / math.sqrt(n_g))",
        "    se = float(samples.std(unbiased=False) / math.sqrt(n_g))",
        ("tests/sharpness/test_sharpness_spectra.py",),
    ),
    Mutation(
        "report: the regime taken from the first method listed, not AdamW",
        "src/flatlm/lm/report.py",
        "    row = summary.get(baseline) or next(iter(summary.values()), {})",
        "    row = next(iter(summary.values()), {})",
        ("tests/lm/test_verdicts.py",),
    ),
    Mutation(
        "sharded checkpoint: the previous one loaded unverified",
        "src/flatlm/lm/checkpoint.py",
        "            _verify_sharded(prev)\n",
        "",
        (
            "tests/lm/test_fsdp_workbench.py"
            "::test_a_damaged_previous_checkpoint_is_verified_before_it_is_used",
        ),
    ),
    Mutation(
        "hf: clean_grad_norm copied after grad_norm was overwritten",
        "src/flatlm/integrations/hf.py",
        '            if "grad_norm" in logs:\n                logs["clean_grad_norm"] = logs["grad_norm"]\n'
        '            logs["grad_norm"] = float(self._sam_grad_norm)\n',
        '            logs["grad_norm"] = float(self._sam_grad_norm)\n'
        '            if "grad_norm" in logs:\n                logs["clean_grad_norm"] = logs["grad_norm"]\n',
        (
            "tests/integrations/test_hf.py"
            "::test_trainer_equals_the_hand_written_two_pass_loop[gpt2-sam]",
        ),
    ),
    Mutation(
        "hf: the generators left where the last perturbed pass ended",
        "src/flatlm/integrations/hf.py",
        "            end.restore()",
        "            pass",
        (
            "tests/integrations/test_hf.py"
            "::test_the_generators_end_where_the_clean_passes_left_them[theta-dependent]",
        ),
    ),
    Mutation(
        "workbench: the test loss computed on the validation split",
        "src/flatlm/lm/train.py",
        '    test_data = corpus.splits["test"]',
        '    test_data = corpus.splits["val"]',
        ("tests/lm/test_train.py::test_the_results_numbers_against_hand_computations",),
    ),
    Mutation(
        "policies: ρ = 0 in every group still runs two passes",
        f"{OPTIM}/policies.py",
        '        if all(float(g["rho"]) == 0.0 for g in groups):',
        "        if False:",
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "policies: step counts not restored from a checkpoint",
        f"{OPTIM}/policies.py",
        "        self.counts = dict(zip(KINDS, scalars.step_counts, strict=True))",
        "        self.counts = dict.fromkeys(KINDS, 0)",
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "LookSAM: g_v = g_s, not its part orthogonal to g",
        f"{OPTIM}/combination.py",
        "    out = torch._foreach_mul(clean, (-coef).to(clean[0].dtype))",
        "    out = torch._foreach_mul(clean, 0.0)",
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "AE-SAM: the threshold without c_t·σ",
        f"{OPTIM}/policies.py",
        "grad_sq_norm >= self.mean + self.threshold() * math.sqrt(self.var)",
        "grad_sq_norm >= self.mean",
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "interval: fresh on t % k == 0 instead of composer's (t + 1) % k == 0",
        f"{OPTIM}/policies.py",
        "        return FRESH if (self.t + 1) % self.every == 0 else PLAIN",
        "        return FRESH if self.t % self.every == 0 else PLAIN",
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "RST: every step draws step 0's number",
        f"{OPTIM}/policies.py",
        'return random.Random(f"{self.seed}:{self.t}").random()',
        'return random.Random(f"{self.seed}:0").random()',
        ("tests/optim/test_policies.py",),
    ),
    Mutation(
        "family: WSAM weighs the sharpness by γ, not γ/(1−γ)",
        f"{OPTIM}/combination.py",
        "        weight = self.gamma / (1.0 - self.gamma)",
        "        weight = self.gamma",
        ("tests/optim/test_family.py::test_wsam_is_the_gradient_of_the_weighted_sharpness",),
    ),
    Mutation(
        "family: GSAM adds α·g_⊥ instead of subtracting it",
        f"{OPTIM}/combination.py",
        "        torch._foreach_add_(perturbed, vertical, alpha=-self.alpha)",
        "        torch._foreach_add_(perturbed, vertical, alpha=self.alpha)",
        (
            "tests/optim/test_family.py::test_gsam_descends_on_the_sam_gradient_minus_the_orthogonal_part_of_the_clean_one",
        ),
    ),
    Mutation(
        "family: GSAM's g_⊥ is g_s's part orthogonal to g (LookSAM's), not g's orthogonal to g_s",
        f"{OPTIM}/combination.py",
        "        vertical = orthogonal_part(clean, perturbed)",
        "        vertical = orthogonal_part(perturbed, clean)",
        (
            "tests/optim/test_family.py::test_gsam_equals_pytorch_optimizers_gsam_with_its_proportion_scheduler",
        ),
    ),
    Mutation(
        "family: the engine keeps the clean gradient but never applies the gradient rule",
        f"{OPTIM}/combination.py",
        "            combine_(kept, self.rule)",
        "            pass",
        (
            "tests/optim/test_family.py::test_wsam_equals_pytorch_optimizers_coupled_wsam_and_differs_from_its_decoupled_default",
        ),
    ),
    Mutation(
        "family: the clean gradient is kept only for LookSAM (no rule ever runs)",
        f"{OPTIM}/combination.py",
        "        if self.policy.keeps_clean_gradient or self.rule is not None:",
        "        if self.policy.keeps_clean_gradient:",
        (
            "tests/optim/test_family.py::test_the_classic_two_phase_protocol_combines_too",
            "tests/optim/test_family.py::test_micro_batches_combine_the_accumulated_gradients",
        ),
    ),
    Mutation(
        "family: FriendlySAM starts its EMA at (1 − λ)·g instead of g",
        f"{OPTIM}/directions.py",
        "        momenta: list[Tensor] = [g.clone() for g in grads]  # m = g where none is saved yet",
        "        momenta: list[Tensor] = [g * (1.0 - self.lmbda) for g in grads]",
        (
            "tests/optim/test_family.py::test_friendlysam_perturbs_along_the_gradient_minus_its_ema",
            "tests/optim/test_family.py::test_friendlysam_equals_pytorch_optimizers_friendlysam",
        ),
    ),
    Mutation(
        "family: FriendlySAM ignores σ·m (plain SAM)",
        f"{OPTIM}/directions.py",
        "            scaled = torch._foreach_mul(old, self.sigma)",
        "            scaled = torch._foreach_mul(old, 0.0)",
        ("tests/optim/test_family.py::test_friendlysam_perturbs_along_the_gradient_minus_its_ema",),
    ),
    Mutation(
        "family: GCSAM removes each tensor's global mean, not each row's",
        f"{OPTIM}/directions.py",
        "            g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))",
        "            g.sub_(g.mean())",
        ("tests/optim/test_family.py::test_gcsam_perturbs_along_the_centralized_gradient",),
    ),
    Mutation(
        "family: ρ does not follow the learning rate",
        f"{OPTIM}/schedules.py",
        '            group["rho"] = low + (base - low) * (group["lr"] - self.lr_min) / (lr_max - self.lr_min)',
        '            group["rho"] = base',
        ("tests/optim/test_family.py::test_gsam_rho_follows_the_learning_rate_schedule",),
    ),
    # bSAM, one mutation in each line of Algorithm 1 (docs/algorithms.md, "bSAM")
    Mutation(
        "bsam 1: noise of std 1/(N·s) (pytorch_optimizer's) instead of √(1/(N·s))",
        f"{OPTIM}/bsam.py",
        "        torch._foreach_rsqrt_(std)",
        "        torch._foreach_reciprocal_(std)",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 1: every step draws the first step's noise",
        f"{OPTIM}/bsam.py",
        '            group["noise_draws"] = draw + 1',
        '            group["noise_draws"] = draw',
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 1: the clean pass at θ, the noise drawn but never added",
        f"{OPTIM}/perturbation.py",
        "            torch._foreach_add_(gathered.shards, noise_of(gathered.params))",
        "            noise_of(gathered.params)",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 2: ε scaled to length ρ like SAM's, not ρ·g/s",
        f"{OPTIM}/perturbation.py",
        "            factor: Tensor | float = inverse_norm(norm) if self.direction.to_radius else 1.0",
        "            factor: Tensor | float = inverse_norm(norm)",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 3: g_ε at θ + e + ε (the noise kept in θ, as pytorch_optimizer)",
        f"{OPTIM}/perturbation.py",
        "        self._store_clean(gathered.params)\n        self.active = gathered\n        if gathered.params:\n            torch._foreach_add_(gathered.shards, noise_of(gathered.params))\n",
        "        self.active = gathered\n        if gathered.params:\n            torch._foreach_add_(gathered.shards, noise_of(gathered.params))\n        self._store_clean(gathered.params)\n",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 4: the momentum averages g_ε without δθ",
        f"{OPTIM}/bsam.py",
        "    decayed = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads",
        "    decayed = grads",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 5: s from g_ε, not the noisy-point g",
        f"{OPTIM}/bsam.py",
        "    torch._foreach_mul_(curvature, torch._foreach_abs(noisy_grads))",
        "    torch._foreach_mul_(curvature, torch._foreach_abs(grads))",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 5: the engine never hands g to the base optimizer",
        f"{OPTIM}/engine.py",
        "            base.noisy_grads = dict(zip(handed.params, handed.values, strict=True))",
        "            base.noisy_grads = {}",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 5: s averages (√s·|g| + δ + γ)² (pytorch_optimizer's square)",
        f"{OPTIM}/bsam.py",
        "    torch._foreach_add_(curvature, weight_decay + damping)",
        "    torch._foreach_add_(curvature, weight_decay + damping)\n    torch._foreach_mul_(curvature, curvature)",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
    Mutation(
        "bsam 6: θ divided by the old s (the authors' code's order)",
        f"{OPTIM}/bsam.py",
        "    torch._foreach_mul_(scales, beta2)\n    torch._foreach_add_(scales, curvature, alpha=1.0 - beta2)\n    torch._foreach_addcdiv_(params, momenta, scales, value=-lr)",
        "    torch._foreach_addcdiv_(params, momenta, scales, value=-lr)\n    torch._foreach_mul_(scales, beta2)\n    torch._foreach_add_(scales, curvature, alpha=1.0 - beta2)",
        ("tests/optim/test_bsam.py::test_bsam_equals_algorithm_1_in_float64",),
    ),
]


def _apply(root: Path, m: Mutation) -> None:
    path = root / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(
            f"mutation {m.name!r}: its text occurs {count} times in {m.file} (expected once); "
            "the code moved: update the mutation"
        )
    path.write_text(text.replace(m.old, m.new))


def run(m: Mutation) -> tuple[bool, float, str]:
    """(caught, seconds, last line of pytest's output) for one mutation."""
    with tempfile.TemporaryDirectory(prefix="flatlm-mutant-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "src", root / "src")
        shutil.copytree(REPO / "tests", root / "tests")
        shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
        _apply(root, m)
        env = {**os.environ, "PYTHONPATH": str(root / "src")}
        # The copy, not the installed checkout, must be what the tests import.
        where = subprocess.run(
            [sys.executable, "-c", "import flatlm; print(flatlm.__file__)"],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(root)):
            raise SystemExit(f"the tests would import {where}, not the mutant in {root}")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        return proc.returncode == 1, time.perf_counter() - t0, lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or any(a in m.name for a in argv)]
    survived = []
    for m in chosen:
        caught, seconds, last = run(m)
        status = "caught  " if caught else "SURVIVED"
        print(f"{status} {seconds:5.1f} s  {m.name}  [{' '.join(m.tests)}]  {last}", flush=True)
        if not caught:
            survived.append(m.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
