"""The Lightning mixin: a ``training_step`` that never takes the sharpness-aware step is an
error at the end of the first batch (it trained nothing, and ``fit(max_steps=N)`` never
returned: Lightning's step count moves only when an optimizer steps); one that does, with
only ``max_steps`` set, returns after exactly those steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("pytorch_lightning")

import flatlm.optim  # noqa: E402
from flatlm.integrations.lightning import SharpnessAwareMixin  # noqa: E402
from helpers.optim import QUIET  # noqa: E402


class Lit(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self, step: bool):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.step = nn.Linear(4, 3), step

    def configure_optimizers(self):
        return flatlm.optim.create("sam", self, lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(4, generator=g), int(i % 3)) for i in range(16)]
        return DataLoader(data, batch_size=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if not self.step:  # the mistake: a loss computed, no step taken
            return F.cross_entropy(self.net(x), y)
        return self.sharpness_aware_step(
            forward=lambda: self.net(x), loss_fn=lambda logits: F.cross_entropy(logits, y)
        )


def test_a_training_step_without_the_step_is_an_error_not_a_hang():
    module = Lit(step=False)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=r"Lit\.training_step returned without calling "
                       r"self\.sharpness_aware_step"):  # fmt: skip
        # max_time: without the check this fit never ends (it then fails here after 30 s)
        pl.Trainer(**QUIET, max_steps=3, max_time={"seconds": 30}).fit(module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_fit_with_only_max_steps_returns_after_them():
    module = Lit(step=True)
    trainer = pl.Trainer(**QUIET, max_steps=3)
    trainer.fit(module)
    assert trainer.global_step == 3
