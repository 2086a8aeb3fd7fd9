"""Packaging: one version source, a core that needs torch alone, extras as docs/install.md says,
and modules of an extra that fail with a message naming it. (.ci/run also builds the wheel and
the sdist and installs the wheel into a fresh venv holding only torch.)"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import flatlm

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]

# what no module of the core may need: every third-party package an extra brings
OPTIONAL = (
    "numpy",
    "scipy",
    "tokenizers",
    "matplotlib",
    "yaml",
    "tqdm",
    "curvlinops",
    "einops",
    "opt_einsum",
    "transformers",
    "accelerate",
    "pytorch_optimizer",
    "optuna",
    "sqlalchemy",
    "psycopg",
    "pgserver",
    "pytorch_lightning",
    "lightning",
    "tensorboard",
    "wandb",
)


def _dist(requirement: str) -> str:
    """Normalised distribution name of a requirement string ("PyYAML>=6" -> "pyyaml")."""
    name = re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_extras() -> dict[str, set[str]]:
    """Each extra's distributions; ``flatlm[a,b]`` (as in ``all``) stands for the extras a, b."""
    out: dict[str, set[str]] = {}
    for extra, reqs in EXTRAS.items():
        names: set[str] = set()
        for req in reqs:
            nested = re.fullmatch(r"flatlm\[([\w,\s-]+)\]", req.strip())
            if nested:
                names |= {e.strip() for e in nested.group(1).split(",")}
            else:
                names.add(_dist(req))
        out[extra] = names
    return out


def _documented_extras() -> dict[str, set[str]]:
    """The table of docs/install.md: | `extra` | dist, dist, ... | what it gives |."""
    text = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w-]+)` \| ([^|]+) \|", text, flags=re.MULTILINE)
    assert rows, "docs/install.md has no table of extras"
    return {extra: {_dist(n) for n in cell.split(",") if n.strip()} for extra, cell in rows}


def test_version_has_one_source() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flatlm.__version__"}
    # the installed metadata (built by `pip install -e .` in scripts/setup.sh) agrees
    assert importlib.metadata.version("flatlm") == flatlm.__version__
    # and no other file of the package spells the version out
    literal = re.compile(rf"""["']{re.escape(flatlm.__version__)}["']""")
    spelled = [
        p.relative_to(ROOT).as_posix()
        for p in [ROOT / "pyproject.toml", *sorted((ROOT / "src").rglob("*.py"))]
        if literal.search(p.read_text(encoding="utf-8"))
    ]
    assert spelled == ["src/flatlm/__init__.py"]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog
    assert f"## [{flatlm.__version__}]" in changelog


def test_core_dependencies_are_torch_alone() -> None:
    assert [_dist(d) for d in PYPROJECT["project"]["dependencies"]] == ["torch"]
    meta = importlib.metadata.metadata("flatlm")
    core = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert [_dist(r) for r in core] == ["torch"]


def test_extras_are_as_documented() -> None:
    extras = _pyproject_extras()
    assert set(extras) == {
        "lm",
        "sharpness",
        "hf",
        "lightning",
        "tensorboard",
        "wandb",
        "bench",
        "tune",
        "tune-postgres",
        "dev",
        "all",
    }
    assert _documented_extras() == extras
    meta = importlib.metadata.metadata("flatlm")
    assert set(meta.get_all("Provides-Extra") or []) == set(extras)
    # `flatlm sharpness` is a workbench command: [lm] brings what flatlm.sharpness needs
    assert extras["lm"] >= extras["sharpness"]
    assert extras["all"] == set(extras) - {"all", "dev"}
    # curvlinops stays optional: its backpack dependency would pull a CUDA build of torch
    everything = set().union(*extras.values())
    assert not everything & {"curvlinops-for-pytorch", "backpack-for-pytorch", "torchvision"}


def test_license_file() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


# A child interpreter in which every optional package is unimportable (as in a venv holding torch
# alone; .ci/run checks a real one): the core must import and step; the extras' modules must
# name their extra.
_CHILD = textwrap.dedent(
    """
    import json, sys

    # None in sys.modules: `import numpy` raises ModuleNotFoundError and
    # importlib.util.find_spec("numpy") returns None, exactly as when it is not installed
    BLOCKED = set(sys.argv[1].split(","))
    assert not BLOCKED & {m.split(".")[0] for m in sys.modules}, "imported at start-up"
    for name in BLOCKED:
        sys.modules[name] = None

    import torch
    import flatlm
    import flatlm.optim

    model = torch.nn.Linear(3, 2)
    opt = flatlm.optim.create("sam", model.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    before = model.weight.detach().clone()
    opt.step(forward=lambda: model(x), loss_fn=lambda out: out.square().mean())
    out = {
        "stepped": not torch.equal(before, model.weight.detach()),
        "leaked": sorted(m for m in BLOCKED if sys.modules.get(m) is not None),
    }
    for module in (
        "flatlm.sharpness",
        "flatlm.integrations.hf",
        "flatlm.integrations.accelerate",
        "flatlm.integrations.lightning",
    ):
        try:
            __import__(module)
            out[module] = None
        except ImportError as e:
            out[module] = str(e)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def bare_core() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(OPTIONAL)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_optimizers_need_torch_alone(bare_core: dict) -> None:
    assert bare_core["stepped"]
    assert bare_core["leaked"] == []


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("flatlm.sharpness", "sharpness"),
        ("flatlm.integrations.hf", "hf"),
        ("flatlm.integrations.accelerate", "hf"),  # accelerate comes with [hf]
        ("flatlm.integrations.lightning", "lightning"),
    ],
)
def test_an_extra_module_names_its_extra(bare_core: dict, module: str, extra: str) -> None:
    message = bare_core[module]
    assert message is not None, f"{module} imported without its extra"
    assert f"pip install 'flatlm[{extra}]'" in message


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_names_its_extra(tracker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workbench imports without the trackers' packages (they are imported when a run
    names them); naming one that is missing names the extra of the same name."""
    pytest.importorskip("numpy")  # the workbench's own extra, [lm]
    from flatlm.lm.config import ConfigError, load_config
    from flatlm.lm.trackers import check_trackers

    monkeypatch.setitem(sys.modules, tracker, None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape(f"pip install 'flatlm[{tracker}]'")):
        check_trackers(["jsonl", tracker])
    with pytest.raises(ConfigError, match=re.escape(f"pip install 'flatlm[{tracker}]'")):
        load_config(overrides={"train.log": ["jsonl", tracker]})
