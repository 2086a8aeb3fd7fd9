"""``torch.compile`` with the sharpness-aware step (docs/compile.md).

A compiled model runs under ``step(forward=lambda: model(x), ...)`` unchanged: the two passes are
calls of one compiled graph (the perturbation changes parameter *values*, which Dynamo does not
guard on), so nothing recompiles after the first step. What was checked
(tests/optim/test_compile.py):

- **Dropout.** Inductor generates its own random numbers (``fallback_random=False``, the
  default) from seeds it draws from the default generators when the graph runs; the engine
  restores those generators before the perturbed pass, so both passes see the same masks (no
  flag needed). Inductor's masks differ from eager PyTorch's, so a compiled run's dropout is not
  an eager run's; ``torch._inductor.config.fallback_random = True`` makes them eager's.
- **Graphs.** One graph for the forward with gradients, compiled at the first step. The
  functional methods with ``perturb_every > 1`` add one more (their clean forward runs without
  gradients), :func:`flatlm.optim.batchnorm.update_stats_once` one more (the frozen variant of a
  batch-norm layer); each is compiled once, at its first use.

:func:`compile_model` is what the workbench calls for ``train.compile``; :func:`compile_counts`
reads Dynamo's counters, to check that nothing recompiles after the first steps.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["CompileCounts", "compile_counts", "compile_model"]


@dataclass(frozen=True)
class CompileCounts:
    """Dynamo's totals in this process: frames it compiled and graphs it produced."""

    frames: int
    graphs: int

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(self.frames - other.frames, self.graphs - other.graphs)


def compile_counts() -> CompileCounts:
    """How many frames Dynamo has compiled and graphs it has produced so far (process-wide).
    Take it after the first steps and again later: a difference is a recompilation."""
    from torch._dynamo.utils import counters

    return CompileCounts(
        frames=int(counters["frames"]["total"]), graphs=int(counters["stats"]["unique_graphs"])
    )


def compile_model(
    model: nn.Module,
    *,
    mode: str | None = None,
    dynamic: bool | None = False,
    fullgraph: bool = False,
    backend: str = "inductor",
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Compile ``model``'s forward in place (``nn.Module.compile``) and return it.

    In place, so the module keeps its class, its parameters and its ``state_dict`` keys
    (``torch.compile(model)`` would return a wrapper whose keys start with ``_orig_mod.``):
    checkpoints, DDP wrapping and the optimizer's parameter groups are unaffected. Compile
    before wrapping in DDP. ``dynamic=False`` by default: a training step's shapes are fixed,
    and a shape that changes (a shorter last batch) compiles one more graph rather than a
    dynamic one. Compilation happens at the first forward (the first step).

    On CPU Inductor needs a C++ compiler; without one this fails now, with a message, rather
    than at the first step.
    """
    if backend == "inductor" and not _has_cuda_params(model) and not _cxx_compiler():
        raise RuntimeError(
            "torch.compile's Inductor backend needs a C++ compiler for CPU code (g++, clang++ or "
            "$CXX) and none was found; install one, or train without compile"
        )
    model.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend, options=options)
    return model


def _has_cuda_params(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None
