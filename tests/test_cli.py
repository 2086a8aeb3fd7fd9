"""The ``flatlm`` command line end to end (tiny runs on a temp text file)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from flatlm import cli

TINY = [
    "--set", "model.size=micro", "--set", "model.block_size=16", "--set", "data.tokenizer=char",
    "--set", "train.batch_size=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=2",
    "--set", "train.test_batches=2", "--set", "train.warmup_steps=1", "--set", "train.threads=1",
]  # fmt: skip


WORDS = "the people of these united states congress peace war trade law union"


@pytest.fixture
def text_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path / "cache"))
    words = WORDS.split()
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(300)]
    path = tmp_path / "mine.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def test_train_end_to_end_and_resume(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(text_file),
        *TINY,
        "--out",
        str(out),
        "--quiet",
        "--method",
        "sam",
    ]
    assert cli.main([*args, "--steps", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "sam" and result["seed"] == 3 and result["step"] == 4
    assert f"val loss {result['val_loss']:.4f}" in printed
    assert math.isfinite(result["test_loss"]) and result["test_loss"] < math.log(
        result["vocab_size"]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["data"]["corpus"] == str(text_file)
    # --resume with more steps continues from step 4 instead of starting over
    assert cli.main([*args, "--steps", "6", "--seed", "3", "--resume"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 2, 4, 6]


def test_bad_config_errors_name_the_key(text_file, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr_sceduler = 'cosine'\n")
    assert cli.main(["train", "--config", str(bad), "--data", str(text_file)]) == 2
    assert "unknown config key 'train.lr_sceduler'" in capsys.readouterr().err
    assert cli.main(["train", "--set", "train.steps=lots", "--data", str(text_file)]) == 2
    assert "'train.steps' must be int" in capsys.readouterr().err
    bad.write_text("[train]\nsteps = = 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "malformed config file" in capsys.readouterr().err


def test_truncated_checkpoint_cli_error(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(text_file), *TINY, "--out", str(out), "--quiet"]
    assert cli.main([*base, "--steps", "2"]) == 0
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert cli.main([*base, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is corrupt or truncated" in err


def test_compare_in_parallel_then_report(text_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(text_file), *TINY, "--steps", "2", "--out", str(out),
            "--methods", "adamw", "fsam", "--seeds", "0", "--jobs", "2", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["summary"]) == {"adamw", "fsam"}
    assert f"{results['summary']['fsam']['test_loss']:.4f}" in printed
    assert (out / "val_loss.png").is_file() and (out / "results.md").is_file()
    timing = {"jobs": 2, "device": "cpu", "shared_device": True}
    assert results["timing"].items() >= timing.items()  # and whatever else compare measures
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[:4] == printed.splitlines()[:4]


def test_adding_a_subcommand_is_one_function(capsys):
    @cli.subcommand("hello", "say hello", cli.arg("--name", default="world"))
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 0

    try:
        assert cli.main(["hello", "--name", "flat"]) == 0
        assert capsys.readouterr().out == "hello flat\n"
    finally:
        del cli.SUBCOMMANDS["hello"]


def test_console_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "flatlm.cli", "--help"], capture_output=True, text=True, check=True
    )
    for name in ("train", "compare", "report", "sharpness"):
        assert name in done.stdout


def test_sharpness_subcommand_table_json_and_errors(text_file, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(text_file), *TINY, "--out", str(run), "--quiet"]
    assert cli.main([*base, "--steps", "2"]) == 0
    capsys.readouterr()
    out = tmp_path / "sharp.json"
    argv = ["sharpness", str(run), "--split", "val", "train", "--batches", "1",
            "--what", "hessian", "decomposition", "--lanczos-iters", "4", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["step"] == 2 and set(report["figures"]) == {"val", "train"}
    lam = report["figures"]["val"]["hessian.lambda_max"]
    assert lam > 0 and report["settings"]["lanczos_iters"] == 4
    line = next(x for x in printed.splitlines() if x.startswith("hessian.lambda_max "))
    assert f"{lam:.6g}" in line and "sam.logit_functional_ratio" in printed
    # the checkpoint file itself works too, and gives the same numbers (fixed windows)
    assert cli.main([*argv[:1], str(run / "checkpoint.pt"), *argv[2:]]) == 0
    assert json.loads(out.read_text())["figures"] == report["figures"]
    capsys.readouterr()
    assert cli.main(["sharpness", str(tmp_path / "missing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    assert cli.main(["sharpness", str(run)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_compare_rejects_a_mistyped_method_before_running(text_file, tmp_path, capsys):
    argv = ["compare", "--data", str(text_file), *TINY, "--steps", "2", "--out", str(tmp_path),
            "--methods", "adamw", "gasam:alpah", "--seeds", "0", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "'compare.methods[1]'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
