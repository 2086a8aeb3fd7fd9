"""Every built-in preset parses, and runs all its methods for two steps (scaled down)."""

from __future__ import annotations

import json

import pytest

from flatlm import cli
from flatlm.lm.config import CONFIG_DIR, load_config
from flatlm.lm.models import build_model

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))

# Scaled down to seconds: a micro model on the small test corpus with a char vocabulary; the
# rest of each preset (methods, sharpness_final, train_tokens, arch, ...) stays as it is.
SMALL = [
    "--steps", "2", "--set", "model.size=micro", "--set", "model.block_size=16",
    "--set", "data.tokenizer=char", "--set", "train.batch_size=2", "--set", "train.eval_every=0",
    "--set", "train.eval_batches=1", "--set", "train.test_batches=1", "--set", "train.threads=1",
    "--set", "train.checkpoint_every=0", "--set", "train.sharpness_iters=2",
]  # fmt: skip


def test_the_presets_exist():
    assert {"quick", "paper", "lstm", "overfit"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_every_method_for_two_steps(name, corpus_file, tmp_path, capsys):
    out = tmp_path / name
    argv = ["compare", "--preset", name, "--data", str(corpus_file), *SMALL, "--seeds", "0",
            "--jobs", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    cfg = load_config(preset=name)
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == cfg.compare.methods
    assert "One seed: no verdict is possible" in printed
    if cfg.train.sharpness_final:
        assert all(r["final_sharpness"]["hessian.lambda_max"] > 0 for r in results["runs"])
        assert "λ_max(H)" in printed


def test_preset_shapes():
    paper = load_config(preset="paper")
    n = sum(p.numel() for p in build_model(paper.model, paper.data.vocab_size).parameters())
    assert 13e6 < n < 15e6 and paper.data.vocab_size == 8192 and paper.train.sharpness_final
    # under one epoch of the bundled training split (1.80 M tokens at BPE 8192)
    assert paper.train.steps * paper.train.batch_size * paper.model.block_size < 1.7e6
    lstm = load_config(preset="lstm")
    n = sum(p.numel() for p in build_model(lstm.model, lstm.data.vocab_size).parameters())
    assert lstm.model.arch == "lstm" and lstm.model.dropout == 0.0 and 3e6 < n < 10e6
    assert "gasam:alpha=-1" in lstm.compare.methods and "sam" in lstm.compare.methods
    overfit = load_config(preset="overfit")
    seen = overfit.train.steps * overfit.train.batch_size * overfit.model.block_size
    assert seen / overfit.data.train_tokens >= 10
    quick = load_config(preset="quick")
    assert quick.train.steps == 200 and quick.model.size == "micro"  # unchanged: README default
