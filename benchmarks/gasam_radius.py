"""How long GA-SAM's ε is, in Euclidean units, at one ρ, for each α and radius convention.

Why it exists: with ``radius="ellipsoid"`` ρ bounds ‖ε ⊘ D‖, not ‖ε‖, and D depends on α, so
comparing α at one ρ compares perturbation sizes. This trains a workbench model with GA-SAM for
a few steps (each α its own run, same data and seed) and prints ‖ε‖/ρ on the next batches.

    python benchmarks/gasam_radius.py                       # the quick GPT, α = -1, -0.5, 0.5, 1
    python benchmarks/gasam_radius.py --config docs/experiments/gasam_lstm.toml
"""

from __future__ import annotations

import argparse
import json

import torch

from flatlm.lm.config import load_config
from flatlm.lm.data import get_batch, prepare_corpus, train_split
from flatlm.lm.evaluate import lm_loss
from flatlm.lm.models import build_model
from flatlm.optim import GASAM


def radius_ratios(cfg, alphas, radius: str, steps: int, probes: int) -> dict[str, float]:
    """Mean ‖ε‖/ρ over ``probes`` batches after ``steps`` GA-SAM steps, per α."""
    corpus = prepare_corpus(cfg.data)
    data = train_split(corpus, cfg.data)
    out = {}
    for alpha in alphas:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, corpus.vocab_size)
        rho = 0.05
        opt = GASAM(model.parameters(), rho=rho, alpha=alpha, radius=radius, lr=cfg.optim.lr)
        gen = torch.Generator().manual_seed(cfg.train.seed)
        batch = cfg.train.batch_size
        for _ in range(steps):
            x, y = get_batch(data, batch, cfg.model.block_size, gen)
            opt.step(forward=lambda m=model, x=x: m(x), loss_fn=lambda z, y=y: lm_loss(z, y))
        ratios = []
        for _ in range(probes):
            x, y = get_batch(data, batch, cfg.model.block_size, gen)
            model.zero_grad()
            lm_loss(model(x), y).backward()
            eps = [e for e in opt.perturbation() if e is not None]
            ratios.append(float(torch.sqrt(sum((e.double() ** 2).sum() for e in eps))) / rho)
        out[f"{alpha:g}"] = sum(ratios) / len(ratios)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--config", help="a config file instead of the preset")
    parser.add_argument("--alphas", nargs="+", type=float, default=[-1.0, -0.5, 0.5, 1.0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--probes", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_config(preset=None if args.config else args.preset, path=args.config)
    torch.set_num_threads(1)
    result = {
        radius: radius_ratios(cfg, args.alphas, radius, args.steps, args.probes)
        for radius in ("ellipsoid", "euclidean")
    }
    print(json.dumps({"norm_eps_over_rho": result, "steps": args.steps}, indent=1))
    return result


if __name__ == "__main__":
    main()
