"""benchmarks/reproduce.py: ρ chosen by validation loss, the GPU profile's configs, and an
end-to-end smoke study whose report must agree with the run folders it was built from."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from flatlm.lm.config import config_from_dict
from flatlm.lm.models import resolve_dims
from flatlm.optim import parse_method
from helpers.scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


reproduce = load_benchmark("reproduce")


def test_gpu_profile_builds_cuda_configs_at_sizes_small_and_medium():
    args = reproduce.parse_args(["--profile", "gpu"])
    parts = reproduce.build_parts(args)
    cpu_parts = {p.name: p for p in reproduce.build_parts(reproduce.parse_args([]))}
    assert args.out == "runs/reproduce_gpu"
    assert [p.name for p in parts] == ["gpt-small", "gpt-medium", "lstm"]
    small, medium, lstm = parts
    assert resolve_dims(small.cfg.model) == {"n_layer": 4, "n_head": 4, "n_embd": 256}
    assert resolve_dims(medium.cfg.model) == {"n_layer": 6, "n_head": 6, "n_embd": 384}
    assert lstm.cfg.model.arch == "lstm" and lstm.methods == ("adamw", "sam", "gasam")
    for part in parts:
        cfg = part.cfg
        assert cfg.train.device == "cuda"
        assert cfg.train.sharpness_final and cfg.optim.rho is None
        cpu = cpu_parts["lstm" if part.name == "lstm" else "gpt-micro"].cfg
        assert cfg.train.steps >= 1500 and cfg.train.steps > cpu.train.steps
        tokens = cfg.train.steps * cfg.train.batch_size * cfg.model.block_size
        cpu_tokens = cpu.train.steps * cpu.train.batch_size * cpu.model.block_size
        # more data than the CPU study, but under one epoch of the ~1.8 M-token training split
        assert cpu_tokens < tokens <= 1.6e6
        assert config_from_dict(cfg.to_dict()) == cfg  # what compare() hands its workers
        for method in part.methods:
            for rho in part.grid:
                spec = reproduce.method_spec(method, rho)
                want = {} if method == "adamw" else {"rho": rho}
                assert parse_method(spec) == (method, want)
    assert small.methods == ("adamw", "sam", "fsam", "psam", "pfsam")
    assert small.grid == (0.02, 0.1, 0.5) and lstm.grid == (0.05, 0.2, 1.0)

    cpu_gpt = [cpu_parts["gpt-micro"].cfg, cpu_parts["gpt-tiny"].cfg]
    assert [c.model.size for c in cpu_gpt] == ["micro", "tiny"]
    cpu_lstm = cpu_parts["lstm"].cfg
    assert (cpu_lstm.model.size, cpu_lstm.data.vocab_size, cpu_lstm.train.steps) == (
        "micro",
        2048,
        600,
    )
    for cfg in (*cpu_gpt, cpu_lstm):
        assert cfg.train.device == "cpu" and cfg.train.threads == 1
        assert cfg.data.tokenizer == "bpe" and cfg.train.sharpness_final


def test_gpu_profile_refuses_to_start_without_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        reproduce.main(["--profile", "gpu", "--out", str(tmp_path / "gpu")])
    assert not (tmp_path / "gpu").exists()


# ----------------------------------------------------------------------------- (c) smoke


def _result(out: Path, part: str, method: str, seed: int) -> dict[str, Any]:
    """A final run's result.json (the comparison's runs/ folder: one per method and seed)."""
    return json.loads((out / part / "runs" / f"{method}-s{seed}" / "result.json").read_text())


def _grid(out: Path, part: str, method: str) -> dict[float, float]:
    """The tuning seed's validation loss at each ρ, from the grid trials' own run folders."""
    val = {}
    for folder in (out / part / "trials" / f"tune-{method}").iterdir():
        rho = json.loads((folder / "config.json").read_text())["optim"]["rho"]
        val[rho] = json.loads((folder / "result.json").read_text())["val_loss"]
    return val


@pytest.mark.slow
def test_smoke_study_report_matches_its_runs(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    small = [
        f"data.corpus={json.dumps(str(corpus_file))}",
        "data.tokenizer='char'",
        "model.block_size=16",
        "train.batch_size=4",
        "train.eval_batches=1",
        "train.test_batches=1",
        "train.sharpness_iters=2",
        "train.log_every=1",
    ]
    argv = ["--steps", "3", "--grid", "0.02", "0.5", "--lstm-grid", "0.05", "1.0"]
    argv += ["--seeds", "0", "1", "--sizes", "micro", "--jobs", "1", "--quiet", "--out", str(out)]
    argv += [x for item in small for x in ("--set", item)]
    report = reproduce.main(argv)

    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    data = json.loads((out / "report.json").read_text())
    assert data["complete"] and data["runs_trained"] == 22 and data["runs_reused"] == 0
    assert json.loads(json.dumps(report["parts"])) == data["parts"]
    md = (out / "report.md").read_text()
    grids = {"gpt-micro": (0.02, 0.5), "lstm": (0.05, 1.0)}
    methods = {"gpt-micro": reproduce.GPT_METHODS, "lstm": reproduce.LSTM_METHODS}
    assert list(data["parts"]) == ["gpt-micro", "lstm"]
    for name, part in data["parts"].items():
        assert part["steps"] == 3 and part["config"]["train"]["sharpness_final"]
        assert list(part["methods"]) == list(methods[name])
        adamw = {s: _result(out, name, "adamw", s) for s in (0, 1)}
        section = md.split(f"## {part['title']}\n", 1)[1].split("\n## ", 1)[0]
        for method, row in part["methods"].items():
            if method == "adamw":
                spec = "adamw"
            else:  # the chosen ρ is the argmin of the seed-0 validation losses on disk
                val = _grid(out, name, method)
                assert sorted(val) == sorted(grids[name])
                best = min(val, key=lambda rho: (val[rho], rho))
                spec = f"{method}:rho={best:g}"
                assert part["tuning"][method]["chosen_rho"] == best
                assert row["rho"] == best
                for seed in (0, 1):  # every seed ran at the chosen ρ
                    cfg = json.loads(
                        (out / name / "runs" / f"{method}-s{seed}" / "config.json").read_text()
                    )
                    assert cfg["optim"]["rho"] == best
                assert _result(out, name, method, 0)["val_loss"] == val[best]  # the grid's run
            assert row["spec"] == spec and row["seeds"] == [0, 1]
            res = {s: _result(out, name, method, s) for s in (0, 1)}
            assert row["test_loss"] == pytest.approx(
                statistics.fmean(r["test_loss"] for r in res.values())
            )
            assert row["val_loss"] == pytest.approx(
                statistics.fmean(r["val_loss"] for r in res.values())
            )
            lam = [r["final_sharpness"]["hessian.lambda_max"] for r in res.values()]
            assert row["lambda_max"] == pytest.approx(statistics.fmean(lam))
            assert row["lambda_max_std"] == pytest.approx(statistics.stdev(lam))
            if method != "adamw":
                diffs = [res[s]["test_loss"] - adamw[s]["test_loss"] for s in (0, 1)]
                delta = row["delta_test_vs_adamw"]
                assert delta["mean"] == pytest.approx(statistics.fmean(diffs))
                assert delta["t_low"] < delta["mean"] < delta["t_high"] or delta["std"] == 0
                assert row["verdict_test"] == delta["verdict"]
            # a row for every method in the headline table, with its numbers
            line = next(
                x for x in section.splitlines() if x.startswith(f"| {method} | ") and "±" in x
            )
            assert f"{row['test_loss']:.4f} ± " in line
    assert "python benchmarks/reproduce.py --steps 3" in md and "Wall time" in md
    for png in ("test_loss.png", "lambda_max.png", "rho_grid.png", "plots/gpt-micro/val_loss.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert png in md

    # the same command again trains nothing and reports the same numbers
    reproduce.main([*argv, "--resume"])
    again = json.loads((out / "report.json").read_text())
    assert again["runs_trained"] == 0 and again["runs_reused"] == 22
    assert again["parts"] == data["parts"]
