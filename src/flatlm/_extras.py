"""Optional dependencies: import one, or fail with a message that says how to install it.

``pip install flatlm`` installs torch alone (the optimizers, :mod:`flatlm.optim`). Everything else
is an extra (see docs/install.md): ``[lm]`` the workbench and CLI, ``[sharpness]`` the diagnostics,
``[hf]`` the transformers Trainer, ``[lightning]``, ``[bench]``, ``[dev]``, ``[all]``. A module that
needs an extra calls :func:`require` (or catches ``ImportError`` and raises
:class:`MissingExtraError`), so a missing package names the extra that brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Import name -> the distribution pip installs it from, where the two differ.
DISTRIBUTIONS = {
    "yaml": "pyyaml",
    "curvlinops": "curvlinops-for-pytorch",
    "pytorch_lightning": "pytorch-lightning",
}


class MissingExtraError(ImportError):
    """An optional dependency is missing. ``module`` is what was imported, ``extra`` the flatlm
    extra that installs it (``None`` when no extra does, e.g. curvlinops); ``name`` (as for any
    ``ImportError``) is the top-level package that could not be imported."""

    def __init__(
        self,
        module: str,
        extra: str | None,
        *,
        feature: str | None = None,
        hint: str | None = None,
        cause: ImportError | None = None,
    ) -> None:
        top = module.split(".")[0]
        dist = DISTRIBUTIONS.get(top, top)
        how = hint or (f"pip install 'flatlm[{extra}]'" if extra else f"pip install {dist}")
        msg = f"{feature or 'this feature of flatlm'} needs {dist}: {how}"
        if cause is not None and cause.name not in (None, top, module):
            # the package is there but one of its own imports failed: say which
            msg += f" (importing {module} failed: {cause})"
        super().__init__(msg, name=top)
        self.module = module
        self.extra = extra


def require(
    module: str,
    extra: str | None,
    *,
    feature: str | None = None,
    hint: str | None = None,
) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingExtraError` naming ``extra``.

    ``feature`` says what needs it (default: "this feature of flatlm"); ``hint`` replaces the
    install command (for packages no extra installs)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(module, extra, feature=feature, hint=hint, cause=e) from e
