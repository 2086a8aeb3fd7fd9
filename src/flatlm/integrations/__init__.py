"""Integrations of flatlm's optimizers with other training frameworks.

Each lives in its own submodule and imports its framework only when that submodule is imported,
so ``import flatlm`` never pulls in optional dependencies:

- :mod:`flatlm.integrations.hf`: a ``transformers.Trainer`` that trains with any flatlm method
  (``pip install flatlm[hf]``).
"""

__all__: list[str] = []
