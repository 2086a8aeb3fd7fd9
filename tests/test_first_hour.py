"""What a new user tripped on in the first hour (issue 30), each through the real ``flatlm``
command (a subprocess, as a user runs it) on tiny runs of a temp text file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.scripts import TINY_RUN

WORDS = [
    "the",
    "people",
    "of",
    "these",
    "united",
    "states",
    "congress",
    "peace",
    "war",
    "trade",
    "law",
    "union",
]


def _text(path: Path, shift: int = 0) -> Path:
    paragraphs = [
        " ".join(WORDS[(i * 7 + j + shift) % len(WORDS)] for j in range(60)) for i in range(200)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return path


def flatlm(*args: str, cwd: Path, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``flatlm ARGS`` in ``cwd`` (``python -m flatlm.cli``: the installed entry point's code)."""
    env = os.environ | {"FLATLM_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "flatlm.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"flatlm {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def tiny(**sets: str) -> list[str]:
    """``--set`` flags for a TINY_RUN-sized run (dots written as ``__`` in ``sets``)."""
    items = TINY_RUN | {k.replace("__", "."): v for k, v in sets.items()}
    return [x for k, v in items.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A user's working directory with two small corpora under corpus/."""
    _text(tmp_path / "work" / "corpus" / "speeches.txt")
    _text(tmp_path / "work" / "corpus" / "letters.txt", shift=3)
    return tmp_path / "work"


# ----------------------------------------------------------------------------- 2, 3, 8: run folders


def test_default_folders_of_other_settings_never_collide_and_carry_no_colon(home, tmp_path):
    """Two corpora without --out get two folders (the corpus's name and a hash of the settings),
    a method spec's ':' becomes '_' (docs/workbench.md), and the same command again finds the
    same folder (so --resume works without --out)."""
    cache = tmp_path / "cache"
    common = ["train", "--steps", "2", "--quiet", "--method", "gasam:alpha=-1", *tiny()]
    flatlm(*common, "--data", "corpus/speeches.txt", cwd=home, cache=cache)
    flatlm(*common, "--data", "corpus/letters.txt", cwd=home, cache=cache)
    runs = sorted(p.relative_to(home / "runs").as_posix() for p in home.glob("runs/*/*"))
    assert len(runs) == 2, runs
    assert runs[0].startswith("default-letters-") and runs[1].startswith("default-speeches-")
    assert all(r.endswith("/gasam_alpha=-1-s0") and ":" not in r for r in runs)
    again = flatlm(*common, "--steps", "3", "--resume", "--data", "corpus/letters.txt",
                   cwd=home, cache=cache)  # fmt: skip
    assert f"-> runs/{runs[0]}" in again.stdout
    result = json.loads((home / "runs" / runs[0] / "result.json").read_text())
    assert result["step"] == 3


def test_a_run_folder_works_from_another_directory_and_with_a_moved_corpus(home, tmp_path):
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = home / "runs" / "mine"
    flatlm("train", "--steps", "2", "--quiet", "--data", "corpus/speeches.txt", *tiny(),
           "--out", "runs/mine", cwd=home, cache=cache)  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["corpus"] == str(home / "corpus" / "speeches.txt")  # absolute
    sharp = ["sharpness", str(run), "--what", "hessian", "--batches", "1", "--lanczos-iters", "3"]
    flatlm(*sharp, cwd=elsewhere, cache=cache)
    moved = elsewhere / "speeches.txt"
    (home / "corpus" / "speeches.txt").rename(moved)
    done = flatlm(*sharp, cwd=elsewhere, cache=cache, check=False)
    assert done.returncode == 2 and "pass --data PATH" in done.stderr
    flatlm(*sharp, "--data", str(moved), cwd=elsewhere, cache=cache)
    assert json.loads((run / "sharpness.json").read_text())["step"] == 2
    _text(elsewhere / "other.txt", shift=5)  # other text: refused by its fingerprint
    done = flatlm(*sharp, "--data", "other.txt", cwd=elsewhere, cache=cache, check=False)
    assert done.returncode == 2 and "another corpus/tokenizer" in done.stderr


def test_a_relative_corpus_path_of_an_older_run_is_found_above_its_folder(tmp_path):
    from flatlm.lm.checkpoint import CheckpointError, _corpus_path

    _text(tmp_path / "corpus" / "a.txt")
    ckpt = tmp_path / "runs" / "x" / "sam-s0" / "checkpoint.pt"
    assert _corpus_path("corpus/a.txt", ckpt) == str(tmp_path / "corpus" / "a.txt")
    assert _corpus_path("sotu", ckpt) == "sotu"
    with pytest.raises(CheckpointError, match="pass --data PATH"):
        _corpus_path("corpus/b.txt", ckpt)


# ----------------------------------------------------------------------------- 7: discovery


def test_help_version_and_methods_list_what_exists(tmp_path):
    from flatlm import __version__
    from flatlm.optim import METHODS
    from flatlm.optim.registry import method_info

    cache = tmp_path / "cache"
    usage = flatlm("train", "--help", cwd=tmp_path, cache=cache).stdout
    flat = " ".join(usage.split())
    assert all(name in flat for name in METHODS)  # from the registry: all ten
    assert "quick" in flat and "paper" in flat and "lstm" in flat  # presets listed
    assert flatlm("--version", cwd=tmp_path, cache=cache).stdout.strip() == f"flatlm {__version__}"
    listed = flatlm("methods", cwd=tmp_path, cache=cache).stdout
    rows = {line.split()[0]: line for line in listed.splitlines()[1:] if line.strip()}
    assert set(METHODS) <= set(rows)
    assert "alpha=1.0" in rows["gasam"] and "radius='euclidean'" in rows["gasam"]
    assert rows["asam"].split()[2] == f"{method_info('asam').rho:g}"
    assert rows["msam"].split()[3] == "1" and rows["sam"].split()[3] == "2"  # passes
    assert "perturb_every=1" in listed and "max_grad_norm=None" in listed
    # the step policies' options with the defaults make_policy uses (LookSAM's alpha from the
    # paper, AE-SAM's thresholds, RST's probability), and the ρ schedule option
    from flatlm.optim.policies import AESAM, LookSAM, RandomSwitch, make_policy

    looksam = make_policy("looksam", every=5)
    aesam = make_policy("aesam", total_steps=10)
    rst = make_policy("rst")
    assert isinstance(looksam, LookSAM) and isinstance(aesam, AESAM)
    assert isinstance(rst, RandomSwitch)
    for option, value in [
        ("looksam_alpha", looksam.alpha),
        ("aesam_delta", aesam.delta),
        ("aesam_c_start", aesam.c_start),
        ("aesam_c_end", aesam.c_end),
        ("rst_p", rst.p),
        ("policy_seed", rst.seed),
    ]:
        assert f"{option}={value!r}" in listed
    assert "rho_schedule" in listed


# Registered after the README's main-job table was measured; adding them re-runs the main job.
NOT_YET_IN_THE_MAIN_JOB = {"wsam", "gsam", "friendlysam", "gcsam", "bsam"}


def test_the_main_job_compares_every_method_but_the_newest():
    from flatlm.lm.config import load_config
    from flatlm.optim import METHODS

    methods = load_config("quick").compare.methods
    assert "msam" in methods
    assert methods == [m for m in METHODS if m not in NOT_YET_IN_THE_MAIN_JOB]


# ----------------------------------------------------------------------------- 1, 10: report


def test_compare_into_a_folder_of_other_runs_leaves_them_out_by_name(home, tmp_path):
    """A comparison's table holds only runs made with its own settings: another seed compared
    with other steps into a folder that holds an older comparison's run keeps its own run
    alone (a run it would replace is refused outright: the reliability checks)."""
    cache = tmp_path / "cache"
    base = ["compare", "--data", "corpus/speeches.txt", *tiny(), "--methods", "adamw", "--quiet"]
    flatlm(*base, "--steps", "2", "--seeds", "0", "--out", "runs/cmp", cwd=home, cache=cache)
    done = flatlm(*base, "--steps", "3", "--seeds", "1", "--out", "runs/cmp", cwd=home, cache=cache)
    results = json.loads((home / "runs" / "cmp" / "results.json").read_text())
    assert results["summary"]["adamw"]["seeds"] == [1]
    assert [r["run_dir"] for r in results["runs"]] == ["runs/adamw-s1"]
    (left,) = results["other_settings"]
    assert left["run"] == "runs/adamw-s0"
    assert left["differs"] == ["train.steps = 2 there, 3 in this comparison"]
    assert "1 run folder left out: made with other settings" in done.stdout
    assert "runs/adamw-s0 | train.steps = 2 there, 3 in this comparison" in done.stdout
    assert "rough" in done.stdout  # the step times say they are no cost measure
    # flatlm report on one run folder: its row, nothing written into it
    run = home / "runs" / "cmp" / "runs" / "adamw-s1"
    before = sorted(p.name for p in run.iterdir())
    shown = flatlm("report", str(run), cwd=home, cache=cache).stdout
    result = json.loads((run / "result.json").read_text())
    assert f"{result['val_loss']:.4f}" in shown and "adamw seed 1, step 3" in shown
    assert "±" not in shown  # one seed has no spread: the mean alone, not "± 0.0000"
    assert sorted(p.name for p in run.iterdir()) == before and "wrote" not in shown


# ----------------------------------------------------------------------------- 10: data, resume


def test_a_gzip_file_in_a_data_folder_is_named_and_exclude_leaves_it_out(home, tmp_path):
    import gzip

    cache = tmp_path / "cache"
    folder = home / "corpus"
    (folder / "old.txt.gz").write_bytes(gzip.compress(b"compressed text " * 100))
    argv = ["train", "--steps", "2", "--quiet", "--data", "corpus", *tiny(), "--out", "runs/gz"]
    done = flatlm(*argv, cwd=home, cache=cache, check=False)
    assert done.returncode == 2
    assert "old.txt.gz is gzip-compressed data, not text" in done.stderr
    assert "--exclude 'old.txt.gz'" in done.stderr and "latin-1" not in done.stderr
    flatlm(*argv, "--exclude", "*.gz", cwd=home, cache=cache)
    only = flatlm(*argv[:-1], "runs/one", "--include", "letters.*", cwd=home, cache=cache)
    assert "-> runs/one" in only.stdout
    configs = [json.loads((home / "runs" / r / "config.json").read_text()) for r in ("gz", "one")]
    assert configs[0]["data"]["exclude"] == ["*.gz"] and configs[1]["data"]["include"] == [
        "letters.*"
    ]
    done = flatlm(*argv[:-1], "runs/none", "--include", "*.md", cwd=home, cache=cache, check=False)
    assert done.returncode == 2 and "none of its 3 files is left" in done.stderr


def test_a_resume_says_where_it_resumed(home, tmp_path):
    cache = tmp_path / "cache"
    argv = ["train", "--quiet", "--data", "corpus/speeches.txt", *tiny(), "--out", "runs/r"]
    first = flatlm(*argv, "--steps", "2", cwd=home, cache=cache)
    assert "resumed at step" not in first.stdout + first.stderr
    again = flatlm(*argv, "--steps", "4", "--resume", cwd=home, cache=cache)
    assert "resumed at step 2 of 4 from runs/r" in again.stdout
    assert "resumed" not in again.stderr  # stderr holds errors only (a full disk: one line)
