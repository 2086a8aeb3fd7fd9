"""Where a method's perturbation ε lands, and how much loss it buys, at a trained checkpoint.

Why it exists: in ``benchmarks/reproduce.py`` the preconditioned methods barely react to ρ while
SAM and Functional-SAM swing by 0.8 nats over the same grid. One explanation to check: with
AdamW's P = √v̂ + eps, P⁻¹g is largest where v̂ is smallest, i.e. on coordinates that rarely get
gradient (the embedding rows of tokens absent from the batch), so a preconditioned ε of norm ρ
might spend its norm where it cannot change the loss. (Measured answer: docs/results.md.)

    python benchmarks/perturbation_anatomy.py runs/reproduce_cpu/gpt-micro/runs/psam_rho=0.1-s0

For the checkpoint's weights and AdamW state and one fixed training batch it prints, per
direction rule (SAM's g/‖g‖ and the preconditioned P⁻¹g/‖P⁻¹g‖ from the same gradient): the share
of ‖ε‖² on the token-embedding rows of tokens not in the batch, on the whole embedding, and on the
top 1 % of coordinates; and the loss increase L(θ+ε) − L(θ) for ε of norm ρ along each.
"""

from __future__ import annotations

import argparse
import json

import torch

from flatlm.lm.checkpoint import load_trained
from flatlm.lm.data import train_split
from flatlm.lm.evaluate import fixed_batches, lm_loss
from flatlm.lm.train import make_optimizer
from flatlm.optim import PreconditionedSAM


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def _loss_at(model, params, eps, scale, x, y) -> float:
    for p, e in zip(params, eps, strict=True):
        p.add_(e, alpha=scale)
    loss = float(lm_loss(model(x), y))
    for p, e in zip(params, eps, strict=True):
        p.sub_(e, alpha=scale)
    return loss


def anatomy(run: str, rhos: list[float], batch_size: int) -> dict:
    model, cfg, corpus, ckpt = load_trained(run)
    opt = make_optimizer(model, cfg.optim, grad_clip=cfg.train.grad_clip)
    if not isinstance(opt, PreconditionedSAM):
        raise SystemExit(f"{run} is a {cfg.optim.method} run; give a psam run (its AdamW state)")
    opt.load_state_dict(ckpt["optimizer"])
    data = train_split(corpus, cfg.data)
    ((x, y),) = fixed_batches(data, 1, batch_size, cfg.model.block_size, "train", "cpu")

    params = [p for g in opt.param_groups for p in g["params"]]
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(x), y)
    loss.backward()
    clean = loss.detach()
    grads = [p.grad.clone() for p in params]
    unit = {"sam": [g / _flat(grads).norm() for g in grads]}
    eps = opt.perturbation()  # ρ P⁻¹g/‖P⁻¹g‖ with the checkpoint's ρ and AdamW state
    rho_run = _flat(eps).norm()
    unit["psam"] = [e / rho_run for e in eps]

    wte = model.wte.weight
    index = next(i for i, p in enumerate(params) if p is wte)
    absent = torch.ones(wte.shape[0], dtype=torch.bool)
    absent[torch.cat([x.reshape(-1), y.reshape(-1)]).unique()] = False
    out = {"run": run, "clean_loss": float(clean), "absent_token_rows": int(absent.sum())}
    for name, u in unit.items():
        total = float(_flat(u).pow(2).sum())
        flat = _flat(u).pow(2)
        top = flat.topk(max(1, flat.numel() // 100)).values.sum()
        out[name] = {
            "share_absent_token_rows": float(u[index][absent].pow(2).sum()) / total,
            "share_embedding": float(u[index].pow(2).sum()) / total,
            "share_top_1pct_coordinates": float(top) / total,
            "loss_increase": {
                f"{rho:g}": _loss_at(model, params, u, rho, x, y) - float(clean) for rho in rhos
            },
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a psam run folder (or its checkpoint.pt)")
    parser.add_argument("--rho", nargs="+", type=float, default=[0.02, 0.1, 0.5])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    result = anatomy(args.run, args.rho, args.batch)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
