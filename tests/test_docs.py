"""The docs' examples run, and their result tables are generated from result files.

Every ```bash and ```python block of README.md and docs/*.md is an example, handled by the HTML
comment on the line right before it (none = ``run``):

- ``<!-- doctest: run (note) -->``: bash lines run one after another in a scratch project folder
  (``docs/``, ``benchmarks/``, ``examples/``, ``scripts/`` linked in, ``my_texts/`` a small text
  folder): ``flatlm train|compare|tune`` with tiny overrides appended (micro model, char tokens
  on a small corpus unless the line has ``--data``, 2 steps, one process, 2 tuning trials per
  method), ``flatlm sharpness`` with
  one batch and 3 Lanczos products. A path a line reads must exist after the lines above it, so
  a stale path or option fails. Python blocks run with the ``tiny_lm`` names defined (``model``,
  ``batches``, ``x``, ``y``, ``loss_fn``, ``fixed_batch``).
- ``<!-- doctest: parse (why) -->``: each flatlm line is parsed and its config loaded (options,
  presets, config files, method names checked), nothing runs.
- ``<!-- doctest: setup NAME (note) -->``: a Python block that runs with the names of setup NAME.
- ``<!-- doctest: skip (why) -->``: not run; the reason is required.

Rules, whatever the marker: ``pip install`` lines never run (tests install nothing; CI's wheel
build and scripts/setup.sh cover installation); ``python SCRIPT.py ARGS`` lines (benchmarks,
examples: minutes to hours) get their arguments parsed by the script's own argparse parser and
stop there; ``torchrun ... -m flatlm.cli ARGS`` is parsed like a flatlm line
(tests/lm/test_torchrun.py launches ranks). Any other command needs a marker.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
DIRECTIVES = {"run", "parse", "skip", "setup"}
MARKER = re.compile(
    r"^<!--\s*doctest:\s*(?P<directive>[\w-]+)(?:\s+(?P<name>[\w-]+))?"
    r"\s*(?:\((?P<note>.*)\))?\s*-->\s*$"
)
FENCE = re.compile(r"^```\s*(?P<lang>[\w-]*)\s*$")

# Markers for blocks in files whose owners have not added one yet: (file, the block's first
# line) -> the marker. Each entry must match a block that has no marker of its own; move it
# into the file (as the HTML comment) and delete it here.
# Appended to `flatlm train|compare` lines in run mode (--set wins over everything before it).
TINY = {
    "model.size": "micro",
    "model.n_layer": "0",
    "model.n_head": "0",
    "model.n_embd": "0",
    "model.block_size": "16",
    "data.tokenizer": "char",
    "train.steps": "2",
    "train.batch_size": "2",
    "train.warmup_steps": "1",
    "train.eval_every": "1",
    "train.eval_batches": "1",
    "train.test_batches": "1",
    "train.log_every": "1",
    "train.threads": "1",
    "train.sharpness_iters": "2",
    "compare.jobs": "1",
}


class DocExampleError(AssertionError):
    """An example of the docs does not work as written."""


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence
    lang: str  # "bash" or "python"
    code: str
    directive: str
    name: str  # setup NAME
    note: str
    marked: bool  # an explicit marker in the file

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def runs_flatlm(self) -> bool:
        return self.directive == "run" and any(
            cmd and cmd[0] == "flatlm" for cmd in commands(self.code)
        )


def parse_marker(text: str) -> tuple[str, str, str]:
    m = MARKER.match(text.strip())
    if m is None:
        raise DocExampleError(f"malformed doctest marker: {text.strip()!r}")
    directive, name, note = m["directive"], m["name"] or "", (m["note"] or "").strip()
    if directive not in DIRECTIVES:
        raise DocExampleError(f"unknown doctest directive {directive!r} in {text.strip()!r}")
    if directive in ("skip", "parse") and not note:
        raise DocExampleError(f"doctest {directive} must say why, in parentheses: {text!r}")
    if directive == "setup" and name not in SETUPS:
        raise DocExampleError(f"unknown doctest setup {name!r} (known: {', '.join(SETUPS)})")
    return directive, name, note


def blocks_of(text: str, file: str) -> list[Block]:
    """The example blocks of one markdown text, with their directives."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            if lines[i].lstrip().startswith("<!-- doctest:") and not (
                i + 1 < len(lines) and FENCE.match(lines[i + 1])
            ):
                raise DocExampleError(f"{file}:{i + 1}: a doctest marker not right before a block")
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        code = "\n".join(lines[start + 1 : i]) + "\n"
        i += 1
        lang = LANGS.get(fence["lang"])
        if lang is None:  # layout trees, output listings: not examples
            continue
        marker = lines[start - 1] if start and "<!-- doctest:" in lines[start - 1] else None
        directive, name, note = parse_marker(marker) if marker else ("run", "", "")
        out.append(Block(file, start + 1, lang, code, directive, name, note, marker is not None))
    return out


def doc_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in blocks_of(p.read_text(), str(p.relative_to(ROOT)))]


def commands(code: str) -> list[list[str]]:
    """The shell lines of a bash block, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- python setups


def _tiny_lm() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    vocab, length = 24, 8

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, vocab)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.mix(self.emb(idx))))

    batches = [
        (torch.randint(vocab, (2, length)), torch.randint(vocab, (2, length))) for _ in range(3)
    ]
    x, y = batches[0]
    return {
        "torch": torch,
        "F": F,
        "nn": nn,
        "model": TinyLM(),
        "batches": batches,
        "x": x,
        "y": y,
        "fixed_batch": batches[0],
        "loss_fn": lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten()),
    }


def _cli() -> dict[str, Any]:
    from flatlm import cli

    return {"subcommand": cli.subcommand, "arg": cli.arg, "argparse": argparse}


SETUPS = {"tiny_lm": _tiny_lm, "cli": _cli}


def run_python(block: Block) -> None:
    from flatlm import cli
    from flatlm.lm._process import torch_threads

    before = set(cli.SUBCOMMANDS)
    namespace = SETUPS[block.name or "tiny_lm"]()
    try:
        with torch_threads(1):  # tiny models: more threads only contend with other processes
            exec(compile(block.code, block.id, "exec"), namespace)
        if set(cli.SUBCOMMANDS) - before:  # a documented subcommand must build into the parser
            cli.build_parser()
    except SystemExit as e:
        raise DocExampleError(f"{block.id}: the example exited ({e})") from e
    except Exception as e:
        raise DocExampleError(f"{block.id}: {type(e).__name__}: {e}") from e
    finally:
        for name in set(cli.SUBCOMMANDS) - before:
            del cli.SUBCOMMANDS[name]


# ----------------------------------------------------------------------------- bash lines


class _Parsed(Exception):
    pass


def _flatlm(argv: list[str], where: str, *, run: bool) -> None:
    """One flatlm command line: parsed and its config loaded, or run in-process at tiny scale."""
    from flatlm import cli

    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:
        raise DocExampleError(f"{where}: `flatlm {shlex.join(argv)}` does not parse") from e
    if not run:
        study = args.command == "tune" or (
            args.command == "compare" and (args.tune or args.storage)
        )
        if study:  # checked as the command checks it: make_job, each method with its space
            try:
                cli.study_job(args, compare=args.command == "compare")
            except Exception as e:
                raise DocExampleError(f"{where}: `flatlm {shlex.join(argv)}`: {e}") from e
            return
        extra = {
            "train": lambda: {"optim.method": args.method, "train.seed": args.seed},
            "compare": lambda: {
                "compare.methods": args.methods,
                "compare.seeds": args.seeds,
                "compare.jobs": args.jobs,
            },
        }.get(args.command)
        if extra is not None:
            try:
                cli._load(args, extra())
            except Exception as e:
                raise DocExampleError(f"{where}: `flatlm {shlex.join(argv)}`: {e}") from e
        return
    if args.command in ("train", "compare", "tune"):
        tiny = dict(TINY)
        if args.data is None:
            tiny["data.corpus"] = str(Path("tiny_corpus.txt").resolve())
        argv = argv + [x for k, v in tiny.items() for x in ("--set", f"{k}={v}")]
        if args.command == "tune" or getattr(args, "tune", False):
            argv += ["--trials", "2"]  # two tuning trials per method
    elif args.command == "sharpness":
        argv = [*argv, "--batches", "1", "--lanczos-iters", "3"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    if code != 0:
        raise DocExampleError(
            f"{where}: `flatlm {shlex.join(argv)}` exited {code}:\n{err.getvalue()[-2000:]}"
        )


def _script(argv: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python SCRIPT.py ARGS``: the script's argparse parser must accept ARGS."""
    script = Path(argv[0])
    if not script.is_file():
        raise DocExampleError(f"{where}: no script {argv[0]}")
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        m.setattr(sys, "argv", [str(script), *argv[1:]])
        m.syspath_prepend(str(script.resolve().parent))
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                runpy.run_path(str(script), run_name="__main__")
        except _Parsed:
            return
        except ModuleNotFoundError as e:
            pytest.skip(f"{argv[0]} needs {e.name}, which is not installed here")
        except SystemExit as e:
            raise DocExampleError(
                f"{where}: `python {shlex.join(argv)}` does not parse:\n{err.getvalue()}"
            ) from e
    raise DocExampleError(f"{where}: {argv[0]} never parsed its arguments")


def run_bash(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    for cmd in commands(block.code):
        if not cmd:
            continue
        where = f"{block.id} ({shlex.join(cmd)[:80]})"
        if cmd[:2] == ["pip", "install"]:
            continue  # rule: tests install nothing
        if cmd[0] == "flatlm":
            _flatlm(cmd[1:], where, run=block.directive == "run")
        elif cmd[0] == "torchrun" and "flatlm.cli" in cmd:
            _flatlm(cmd[cmd.index("flatlm.cli") + 1 :], where, run=False)
        elif cmd[:3] == ["python", "-m", "flatlm.cli"]:
            _flatlm(cmd[3:], where, run=block.directive == "run")
        elif cmd[0] == "python" and len(cmd) > 1 and cmd[1].endswith(".py"):
            _script(cmd[1:], where, monkeypatch)
        else:
            raise DocExampleError(
                f"{where}: no rule for `{cmd[0]}` in tests/test_docs.py; run it as a flatlm or "
                "python line, or mark the block `<!-- doctest: skip (why) -->`"
            )


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """About 100 kB of State of the Union text: enough for three splits of a micro model."""
    from flatlm.lm.data import read_sotu

    text = ""
    for _, doc in read_sotu():
        text += doc + "\n\n"
        if len(text) > 100_000:
            break
    return text


@pytest.fixture
def project(tmp_path: Path, tiny_text: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory):
    """A scratch folder that looks like the repository to the examples."""
    for name in ("docs", "benchmarks", "examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "tiny_corpus.txt").write_text(tiny_text)
    texts = tmp_path / "my_texts"
    texts.mkdir()
    third = len(tiny_text) // 3
    for i in range(3):
        (texts / f"part{i}.txt").write_text(tiny_text[i * third : (i + 1) * third])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLATLM_CACHE", str(tmp_path_factory.getbasetemp() / "docs-cache"))
    return tmp_path


def run_block(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.directive == "skip":
        return
    if block.lang == "python":
        run_python(block)
    else:
        run_bash(block, monkeypatch)


# ----------------------------------------------------------------------------- the tests


def _params() -> list[Any]:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.runs_flatlm else [])
        for b in doc_blocks()
    ]


@pytest.mark.parametrize("block", _params())
def test_doc_example(block: Block, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.directive == "skip":
        pytest.skip(f"{block.id}: {block.note}")
    run_block(block, monkeypatch)


def test_markers_are_well_formed() -> None:
    blocks = doc_blocks()  # raises on a malformed or stray marker
    assert any(b.file == "README.md" for b in blocks)
    for b in blocks:
        if b.directive in ("skip", "parse"):
            assert b.note, b.id


def test_the_runner_catches_a_stale_path_and_a_stale_option(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_path = (
        "```bash\n"
        "flatlm compare --preset quick --out runs/quick --methods adamw --seeds 0\n"
        "flatlm report runs/compare-quick   # not where the line above wrote\n"
        "```\n"
    )
    stale_option = "```bash\nflatlm train --preset quick --epochs 3\n```\n"
    stale_script = "```bash\npython benchmarks/overhead.py --no-such-option 1\n```\n"
    stale_method = (
        "<!-- doctest: parse (a test) -->\n```bash\nflatlm compare --methods adamw fsma\n```\n"
    )
    unknown = "```bash\nmake everything\n```\n"
    for text, match in [
        (stale_path, "compare-quick"),
        (stale_option, "does not parse"),
        (stale_script, "does not parse"),
        (stale_method, "fsma"),
        (unknown, "no rule for `make`"),
    ]:
        (block,) = blocks_of(text, "fake.md")
        with pytest.raises(DocExampleError, match=match):
            run_block(block, monkeypatch)
    with pytest.raises(DocExampleError, match="must say why"):
        blocks_of("<!-- doctest: skip -->\n```bash\nls\n```\n", "fake.md")
    with pytest.raises(DocExampleError, match="not right before a block"):
        blocks_of("<!-- doctest: skip (x) -->\n\ntext\n", "fake.md")


# ----------------------------------------------------------------------------- tables


def _docs_tables() -> Any:
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts/docs_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_result_table_in_the_docs_is_generated_from_its_data() -> None:
    dt = _docs_tables()
    marked = 0
    for path in dt.doc_files():
        text = path.read_text()
        marked += len(dt.MARKER.findall(text))
        assert dt.rendered(text) == text, (
            f"{path.relative_to(ROOT)}: a generated table differs from its data; "
            "run python scripts/docs_tables.py"
        )
    assert marked >= 3  # README's summary, workbench's losses and verdicts


def test_tables_render_from_a_comparison_folder(tmp_path: Path) -> None:
    """The path from a real `flatlm compare` folder: results.json -> data set -> tables."""
    from flatlm.lm.report import write_report

    dt = _docs_tables()
    val = {"adamw": [6.10, 6.25, 6.05], "sam": [5.90, 6.04, 5.86], "fsam": [6.15, 6.20, 6.07]}
    (tmp_path / "compare.json").write_text(json.dumps({"methods": list(val), "jobs": 1}))
    for method, losses in val.items():
        for seed, v in enumerate(losses):
            run = tmp_path / "runs" / f"{method}-s{seed}"
            run.mkdir(parents=True)
            result = {
                "method": method, "seed": seed, "status": "completed", "step": 4, "steps": 4,
                "val_loss": v, "test_loss": v + 0.1, "val_ppl": 1.0, "test_ppl": 1.0,
                "time_per_step_s": 0.01, "train_time_s": 0.04, "skipped_steps": 0,
                "train_loss": v - 0.3, "epochs": 0.1,
            }  # fmt: skip
            (run / "result.json").write_text(json.dumps(result))
    write_report(tmp_path)
    data = dt.extract(dt.load_results(tmp_path), source="test")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "fake.json").write_text(json.dumps(data))
    summary = dt.render("fake", "summary", data_dir)
    rows = summary.splitlines()
    assert rows[0].startswith("| method | val loss | test loss | Δ val vs AdamW")
    assert rows[2] == "| adamw | 6.1333 ± 0.1041 | 6.2333 ± 0.1041 | – | baseline |"
    assert rows[3].startswith("| sam | 5.9333 ± 0.0945 | 6.0333 ± 0.0945 | −0.2000 [")
    assert rows[3].endswith("| better |") and rows[4].endswith("| not distinguishable |")
    verdicts = dt.render("fake", "verdicts", data_dir).splitlines()
    assert verdicts[2] == "| adamw | 3 | – | – | baseline |"
    text = "x\n<!-- table fake:losses (generated) -->\nstale\n<!-- /table -->\ny\n"
    assert dt.rendered(text, data_dir) == (
        "x\n<!-- table fake:losses (generated) -->\n"
        + dt.render("fake", "losses", data_dir)
        + "<!-- /table -->\ny\n"
    )
