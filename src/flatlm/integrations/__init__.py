"""Integrations of flatlm's optimizers with other training frameworks.

Each lives in its own submodule and imports its framework only when that submodule is imported,
so ``import flatlm`` never pulls in optional dependencies:

- :mod:`flatlm.integrations.hf`: a ``transformers.Trainer`` that trains with any flatlm method
  (``pip install flatlm[hf]``; docs/hf.md).
- :mod:`flatlm.integrations.lightning`: PyTorch Lightning, through manual optimization
  (``pip install flatlm[lightning]``; docs/lightning.md).
- :mod:`flatlm.integrations.accelerate`: a raw Accelerate loop, with its gradient accumulation
  and GradScaler (``pip install flatlm[hf]``; docs/accelerate.md).
"""

from __future__ import annotations

from typing import Any

import torch

from flatlm.optim import SharpnessAwareOptimizer

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any, who: str) -> SharpnessAwareOptimizer:
    """The flatlm optimizer inside a framework's wrappers (``LightningOptimizer``,
    ``AcceleratedOptimizer``: each keeps the wrapped one as ``.optimizer``), or a TypeError that
    says ``who`` needs one. A ``LightningOptimizer`` also passes ``isinstance`` checks for the
    class it wraps, so wrappers are unwrapped before the check."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, SharpnessAwareOptimizer):
        raise TypeError(
            f"{who} needs a flatlm optimizer (e.g. flatlm.optim.create('fsam', model, lr=...)), "
            f"got {type(inner).__name__}"
        )
    return inner
