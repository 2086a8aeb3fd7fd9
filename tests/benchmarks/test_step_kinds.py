"""benchmarks/step_kinds.py: every kind timed and written, ρ = 0 for the plain kind, on a model
small enough for the test suite (timings not checked)."""

from __future__ import annotations

import json

import pytest

from helpers.scripts import load_benchmark

step_kinds = load_benchmark("step_kinds")
TINY = {
    "model.size": "micro",
    "model.block_size": 16,
    "train.batch_size": 2,
    "data.vocab_size": 300,
}


@pytest.fixture
def tiny_settings(monkeypatch):
    monkeypatch.setattr(
        step_kinds, "SETTINGS", {"lstm": ({"preset": "quick", "overrides": TINY}, 0.2)}
    )


def test_every_kind_is_timed_and_written(tiny_settings, tmp_path):
    path = tmp_path / "kinds.json"
    fast = ["--repeats", "2", "--steps", "1", "--warmup", "1", "--settings", "lstm"]
    out = step_kinds.main([*fast, "--kind", "pe4=sam:perturb_every=4", "--json", str(path)])
    assert json.loads(path.read_text()) == out
    lstm = out["settings"]["lstm"]
    family = {"wsam", "gsam", "friendlysam", "gcsam", "bsam"}
    assert (
        set(lstm["ms"])
        == {"adamw", "fresh", "plain", "reuse", "looksam_reuse", "msam", "pe4"} | family
    )
    assert lstm["vs_adamw"]["adamw"] == 1.0 and lstm["rho"] == 0.2
    assert all(v > 0 for v in lstm["ms"].values())
    assert out["command"].startswith("python benchmarks/step_kinds.py --repeats 2")


def test_the_plain_kind_steps_at_rho_zero_and_the_others_at_the_settings_rho(tiny_settings):
    cfg = step_kinds.load_config(preset="quick", overrides=TINY)
    _, opt, _ = step_kinds._stepper(cfg, "sam", 0.2, 300, zero_rho=True)
    assert [g["rho"] for g in opt.param_groups] == [0.0, 0.0]
    cfg = step_kinds.load_config(preset="quick", overrides=TINY)
    _, opt, _ = step_kinds._stepper(cfg, "sam", 0.2, 300, zero_rho=False)
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.2]


def test_a_bad_kind_is_refused(tiny_settings):
    with pytest.raises(SystemExit):
        step_kinds.main(["--kind", "nospec"])
