"""One comparison folder from the runs of several: for each ``SRC:METHOD``, METHOD's runs of
the comparison (or ``compare --tune``) folder SRC, copied into ``OUT/runs/``; then the report.
The folders must hold the same AdamW runs (equal test loss at every seed: the same config,
seeds and code), or the paired verdicts would compare unlike runs; that is checked. docs/results.md
uses it to put each method's best-tuned study on one cost-quality chart::

    python scripts/best_runs.py runs/all-quick runs/quick:adamw runs/quick:sam \\
        runs/quick-bsam:bsam:num_data=2382634
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

BASELINE = "adamw"


def runs_of(folder: Path, method: str) -> dict[int, Path]:
    """The run folders of ``method`` in a comparison folder, by seed (their result.json)."""
    out = {}
    for run in sorted((folder / "runs").iterdir()):
        result = json.loads((run / "result.json").read_text())
        if result["method"] == method and result.get("status") == "completed":
            out[result["seed"]] = run
    return out


def _test_losses(runs: dict[int, Path]) -> dict[int, float]:
    return {s: json.loads((r / "result.json").read_text())["test_loss"] for s, r in runs.items()}


def combine(out: Path, picks: list[tuple[Path, str]]) -> dict[str, Any]:
    """Copy each pick's runs into ``out`` and write its ``compare.json``; returns it."""
    baseline: dict[int, float] | None = None
    methods, config, seeds = [], None, None
    for src, method in picks:
        theirs = _test_losses(runs_of(src, BASELINE))
        if not theirs:
            raise SystemExit(f"best_runs: {src} holds no completed {BASELINE} runs")
        if baseline is not None and theirs != baseline:
            raise SystemExit(
                f"best_runs: {src} holds other {BASELINE} runs ({theirs} against {baseline}); "
                "its runs cannot share a comparison with the others"
            )
        baseline = theirs
        runs = runs_of(src, method)
        if not runs or (seeds is not None and sorted(runs) != seeds):
            raise SystemExit(f"best_runs: {src} has {method} at seeds {sorted(runs)}")
        seeds = sorted(runs)
        if method in methods:
            raise SystemExit(f"best_runs: {method} is picked twice")
        methods.append(method)
        config = config or json.loads((src / "compare.json").read_text()).get("config")
    if out.exists():
        shutil.rmtree(out)
    (out / "runs").mkdir(parents=True)
    for src, method in picks:
        for run in runs_of(src, method).values():
            shutil.copytree(run, out / "runs" / run.name)
    meta = {"methods": methods, "seeds": seeds, "jobs": None, "config": config}
    meta |= {"device": (config or {}).get("train", {}).get("device"), "per_method_settings": True}
    (out / "compare.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("picks", nargs="+", metavar="SRC:METHOD")
    args = parser.parse_args(argv)
    picks = []
    for item in args.picks:
        src, colon, method = item.partition(":")
        if not colon:
            parser.error(f"{item!r}: expected SRC:METHOD")
        picks.append((Path(src), method))
    combine(args.out, picks)
    from flatlm.lm.report import write_report

    report = write_report(args.out)
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
