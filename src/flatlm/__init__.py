"""flatlm: sharpness-aware training of language models.

``import flatlm`` needs torch alone (it brings :mod:`flatlm.optim`); the workbench
(:mod:`flatlm.lm`), :mod:`flatlm.sharpness` and the integrations need extras (docs/install.md).
"""

from flatlm import optim

# The one source of the version: pyproject.toml reads it (dynamic = ["version"]), and
# CHANGELOG.md has a section for it.
__version__ = "0.2.0"
__all__ = ["__version__", "optim"]
