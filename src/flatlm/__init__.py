"""flatlm: sharpness-aware training of language models."""

from flatlm import optim

__version__ = "0.1.0"
__all__ = ["__version__", "optim"]
