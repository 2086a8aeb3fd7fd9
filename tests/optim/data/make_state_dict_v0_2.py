"""Writes state_dict_v0_2_gasam_perturb_every.pt: a checkpoint in flatlm 0.2's optimizer layout.

Run once, with flatlm 0.2's engine (commit 7455a8a, before the standard layout):

    PYTHONPATH=src:tests python tests/optim/data/make_state_dict_v0_2.py

The file is committed; tests/optim/test_state_layout.py loads it with the current code and checks
that training continues bit for bit as the 0.2 optimizer did in memory. Running this script with
a later flatlm would write the new layout, which is not what the test is for.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import flatlm
from flatlm.optim import create
from helpers.optim import ce, make_batch, make_mlp

OUT = Path(__file__).with_name("state_dict_v0_2_gasam_perturb_every.pt")
# Two groups (decay / no decay) whose parameter order differs from model.parameters().
SPEC = {"name": "gasam", "rho": 0.1, "lr": 0.01, "weight_decay": 0.1, "perturb_every": 2}


def build(model: torch.nn.Module) -> torch.optim.Optimizer:
    kw = {k: v for k, v in SPEC.items() if k != "name"}
    return create(SPEC["name"], model, **kw)


def rounding_probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The loss and gradients of one forward–backward, torch alone: a machine that rounds these
    as the recording one did continues the trajectory bit for bit."""
    loss = ce(y)(model(x))
    loss.backward()
    return [loss.detach(), *(p.grad.clone() for p in model.parameters())]


def main() -> None:
    torch.set_num_threads(1)
    model = make_mlp(seed=0)
    opt = build(model)
    for step in range(3):  # fresh, reused, fresh: the next step reuses the stored direction
        x, y = make_batch(seed=10 + step)
        opt.step(forward=lambda: model(x), loss_fn=ce(y))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # the live tensors move on with the steps below
    assert saved_opt["method_state"] and saved_opt["steps_since_fresh_perturbation"] == 1
    batches = [make_batch(seed=20 + k) for k in range(2)]  # a reused step, then a fresh one
    probe = rounding_probe(copy.deepcopy(model), *batches[0])
    expected = []
    for x, y in batches:
        opt.step(forward=lambda x=x: model(x), loss_fn=ce(y))
        expected.append([p.detach().clone() for p in model.parameters()])
    torch.save(
        {
            "flatlm_version": flatlm.__version__,
            "spec": SPEC,
            "model": saved_model,
            "optimizer": saved_opt,
            "batches": batches,
            "expected_params": expected,
            "probe": probe,
        },
        OUT,
    )
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
