"""The language-model workbench (see docs/workbench.md).

Modules: ``config`` (run configuration), ``data`` (corpora, splits, tokenisers, memmaps),
``models`` (GPT, LSTM), ``train`` (one run), ``compare`` (methods x seeds, report).
Nothing is re-exported here, so ``flatlm.lm.train`` stays the module, not the function.
"""
