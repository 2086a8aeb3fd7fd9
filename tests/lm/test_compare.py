"""Comparison folder: per-run dirs, the table, JSON numbers and plots; report rebuilds them."""

from __future__ import annotations

import json
import statistics

import pytest

from flatlm.lm.compare import compare
from flatlm.lm.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_table_json_plots_and_report_rebuilds(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=3)
    out = tmp_path / "cmp"
    report = compare(cfg, out, ["adamw", "sam"], [0, 1], quiet=True)
    runs = {}
    for method in ("adamw", "sam"):
        for seed in (0, 1):
            runs[method, seed] = json.loads(
                (out / f"runs/{method}-s{seed}/result.json").read_text()
            )
    results = json.loads((out / "results.json").read_text())
    for method in ("adamw", "sam"):
        val = [runs[method, s]["val_loss"] for s in (0, 1)]
        row = results["summary"][method]
        assert row["val_loss"] == pytest.approx(statistics.fmean(val))
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(val))
        assert row["seeds"] == [0, 1]
        tps = [runs[method, s]["time_per_step_s"] for s in (0, 1)]
        assert row["time_per_step_s"] == pytest.approx(statistics.fmean(tps))
    assert results["summary"]["adamw"]["time_vs_adamw"] == pytest.approx(1.0)
    assert len(results["runs"]) == 4 and all(len(r["val_curve"]) == 3 for r in results["runs"])
    table = (out / "results.md").read_text()
    adamw_row = next(line for line in table.splitlines() if line.startswith("| adamw |"))
    assert f"{results['summary']['adamw']['val_loss']:.4f} ± " in adamw_row
    assert report["table"] in table
    for name in ("val_loss.png", "val_loss_by_seed.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert (out / name).stat().st_size > 5000

    for name in ("results.md", "results.json", "val_loss.png"):
        (out / name).unlink()
    rebuilt = write_report(out)
    assert rebuilt["table"] == report["table"]
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert (out / "val_loss.png").is_file()


def test_compare_resume_skips_finished_runs(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__steps=2)
    compare(cfg, tmp_path, ["adamw"], [0], quiet=True)
    result = tmp_path / "runs/adamw-s0/result.json"
    before = result.stat().st_mtime_ns
    compare(cfg, tmp_path, ["adamw"], [0], quiet=True, resume=True)
    assert result.stat().st_mtime_ns == before
    # a changed setting must not silently reuse the old run
    with pytest.raises(ValueError, match=r"train\.batch_size = 4 there, 8 now"):
        compare(
            tiny_cfg(train__steps=2, train__batch_size=8), tmp_path, ["adamw"], [0], resume=True
        )
    assert result.stat().st_mtime_ns == before


def test_report_on_a_non_comparison_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a comparison folder"):
        write_report(tmp_path)
