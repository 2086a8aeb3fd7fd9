"""Sharpness diagnostics for language models: curvature spectra, the SAM gradient decomposition,
SAM-sharpness and random-corruption sharpness (see docs/sharpness.md).

The operators (WHAT curvature: :mod:`.operators`) are kept apart from the solvers (HOW it is
reduced to eigenvalues and traces: :mod:`.solvers`); :func:`sharpness_report` ties them together.

Needs the ``sharpness`` extra (numpy, scipy): ``pip install 'flatlm[sharpness]'``. Checked here,
before any submodule imports them, so a missing one names the extra. The curvlinops backend is
optional and never imported unless asked for (docs/install.md).
"""

from flatlm._extras import MissingExtraError

try:
    import numpy  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401
except ImportError as e:
    raise MissingExtraError(
        e.name or "numpy", "sharpness", feature="flatlm.sharpness", cause=e
    ) from e

from flatlm.sharpness._common import select_params
from flatlm.sharpness.corruption import CorruptionEstimate, corruption_sharpness, sam_sharpness
from flatlm.sharpness.decomposition import (
    SamDecomposition,
    resolve_epsilon,
    sam_decomposition,
    sam_epsilon,
)
from flatlm.sharpness.operators import (
    CurvatureOperator,
    default_fd_step,
    ggn_operator,
    hessian_operator,
)
from flatlm.sharpness.report import ALL_FIGURES, DEFAULT_FIGURES, quick_sharpness, sharpness_report
from flatlm.sharpness.solvers import (
    EigenResult,
    TraceEstimate,
    exact_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    rayleigh_quotient,
    top_eigen,
    trace,
)

__all__ = [
    "ALL_FIGURES",
    "DEFAULT_FIGURES",
    "CorruptionEstimate",
    "CurvatureOperator",
    "EigenResult",
    "SamDecomposition",
    "TraceEstimate",
    "corruption_sharpness",
    "default_fd_step",
    "exact_trace",
    "ggn_operator",
    "hessian_operator",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "quick_sharpness",
    "rayleigh_quotient",
    "resolve_epsilon",
    "sam_decomposition",
    "sam_epsilon",
    "sam_sharpness",
    "select_params",
    "sharpness_report",
    "top_eigen",
    "trace",
]
