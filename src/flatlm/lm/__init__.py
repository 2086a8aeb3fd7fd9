"""The language-model workbench (see docs/workbench.md).

Modules: ``config`` (run configuration), ``data`` (corpora, splits, tokenisers, memmaps),
``models`` (GPT, LSTM), ``evaluate`` (the LM loss on fixed windows), ``checkpoint`` (save,
load, resume), ``train`` (one run), ``trackers`` (where its records go), ``diagnostics``
(sharpness of runs and checkpoints), ``compare`` (methods x seeds), ``report`` (tables and
verdicts), ``plots``, ``stats``.
Nothing is re-exported here, so ``flatlm.lm.train`` stays the module, not the function.
"""

from flatlm._extras import require

# The workbench's own packages (the [lm] extra), checked once: a missing one names the extra.
for _module in ("numpy", "scipy", "yaml", "tqdm"):
    require(_module, "lm", feature="the flatlm workbench (flatlm.lm, the flatlm command)")
del _module
