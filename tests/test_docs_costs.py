"""scripts/docs_tables.py's cost tables: each method's mix of steps priced by the step kinds'
measured times (benchmarks/step_kinds.py), from a real comparison folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["adamw", "sam", "sam:rho_schedule=window:0:0.25", "sam:perturb_every=2", "msam"]
LOOKSAM = "sam:policy=looksam,every=4"  # its in-between steps are a kind of their own
METHODS.append(LOOKSAM)
COUNTED = "sam:perturb_every=4"  # its runs record step counts: they win over the spec's
METHODS.append(COUNTED)


def _docs_tables():
    spec = importlib.util.spec_from_file_location(
        "docs_tables", ROOT / "scripts" / "docs_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    from flatlm.lm.report import run_dir, write_report

    comparison = tmp_path / "cmp"
    (comparison / "runs").mkdir(parents=True)
    (comparison / "compare.json").write_text(json.dumps({"methods": METHODS, "jobs": 1}))
    for i, method in enumerate(METHODS):
        for seed in range(3):
            folder = run_dir(comparison, method, seed)
            folder.mkdir()
            v = 6.0 - 0.05 * i + 0.01 * seed * (i % 2)
            counts = {"fresh": 1, "reuse": 0, "plain": 3} if method == COUNTED else None
            counts = {"fresh": 1, "reuse": 3, "plain": 0} if method == LOOKSAM else counts
            result = {
                "method": method, "seed": seed,
                "status": "completed", "step": 4, "steps": 4, "val_loss": v, "test_loss": v + 0.1,
                "val_ppl": 1.0, "test_ppl": 1.0, "time_per_step_s": 0.01, "train_time_s": 0.04,
                "skipped_steps": 0, "step_counts": counts,
            }  # fmt: skip
            (folder / "result.json").write_text(json.dumps(result))
    write_report(comparison)
    dt = _docs_tables()
    results = dt.load_results(comparison)
    out = tmp_path / "data"
    out.mkdir()
    (out / "lstm_costs.json").write_text(json.dumps(dt.extract(results) | {"setting": "lstm"}))
    ms = {"adamw": 100.0, "fresh": 210.0, "plain": 106.0, "reuse": 120.0, "msam": 102.0}
    ms["looksam_reuse"] = 108.0
    timed = {
        "settings": {"lstm": {"ms": ms, "iqr_ms": dict.fromkeys(ms, 1.0), "specs": dict.fromkeys(ms, "sam"),
                              "vs_adamw": {k: v / 100 for k, v in ms.items()}}},
        "load_avg_1min": [3.0, 3.5], "contended": True, "cpus": 2, "threads": 1, "repeats": 7,
        "steps": 8, "command": "python benchmarks/step_kinds.py",
    }  # fmt: skip
    (out / "step_kinds.json").write_text(json.dumps(timed))
    return out


def test_each_mix_is_priced_by_the_measured_step_kinds(data_dir):
    dt = _docs_tables()
    data = json.loads((data_dir / "lstm_costs.json").read_text())
    assert data["mix"]["sam:rho_schedule=window:0:0.25"] == {"fresh": 0.25, "plain": 0.75}
    assert data["mix"]["sam:perturb_every=2"] == {"fresh": 0.5, "reuse": 0.5}
    assert data["mix"]["msam"] == {"msam": 1.0} and data["mix"]["adamw"] == {"adamw": 1.0}
    assert data["mix"]["sam"] == {"fresh": 1.0}
    assert data["mix"][COUNTED] == {"fresh": 0.25, "plain": 0.75}
    assert data["mix"][LOOKSAM] == {"fresh": 0.25, "looksam_reuse": 0.75}
    costs = {p["method"]: p["cost"] for p in dt.cost_points(data, data_dir)}
    assert costs["sam:rho_schedule=window:0:0.25"] == pytest.approx((0.25 * 210 + 0.75 * 106) / 100)
    assert costs["sam:perturb_every=2"] == pytest.approx((0.5 * 210 + 0.5 * 120) / 100)
    assert costs["sam"] == pytest.approx(2.1) and costs["adamw"] == 1.0
    assert costs[LOOKSAM] == pytest.approx((0.25 * 210 + 0.75 * 108) / 100)


def test_a_family_methods_fresh_step_is_its_own_kind():
    """WSAM's fresh step is timed as the kind "wsam" (its rule's work beyond SAM's), also
    inside a window and under perturb_every."""
    dt = _docs_tables()
    assert dt.step_mix("wsam", None, 100) == {"wsam": 1.0}
    assert dt.step_mix("gcsam:rho_schedule=window:0:0.25", None, 100) == {
        "gcsam": 0.25,
        "plain": 0.75,
    }
    assert dt.step_mix("gsam:perturb_every=4", None, 100) == {"gsam": 0.25, "reuse": 0.75}
    counts = {"fresh": 10, "reuse": 0, "plain": 90}
    assert dt.step_mix("friendlysam", counts, 100) == {"friendlysam": 0.1, "plain": 0.9}
    assert dt.step_mix("sam", None, 100) == {"fresh": 1.0}


def test_the_costs_table_and_the_step_kinds_table(data_dir, tmp_path):
    dt = _docs_tables()
    rows = dt.render("lstm_costs", "costs", data_dir).splitlines()
    assert rows[0].startswith("| method | steps by kind (per step) | cost × AdamW (measured)")
    assert rows[2].startswith("| adamw | adamw 1 | 1.00 | 3 |")
    sam = next(r for r in rows if r.startswith("| sam | "))
    assert "| fresh 1 | 2.10 | 3 |" in sam and "| 100 % |" in sam
    window = next(r for r in rows if r.startswith("| sam:rho_schedule=window:0:0.25 |"))
    assert "| fresh 0.25, plain 0.75 | 1.32 |" in window
    grid = dt.render("lstm_costs", "grid", data_dir).splitlines()
    assert grid[2] == "| adamw | 6.0000 | – |" and grid[3] == "| sam | 5.9500 | −0.0500 |"
    kinds = dt.render("step_kinds", "step_kinds", data_dir)
    assert "| lstm | fresh | `sam` | 210.0 | 1.0 | 2.10 |" in kinds
    assert "Contended: load average 3.0 → 3.5 on 2 CPUs" in kinds
    data = json.loads((data_dir / "lstm_costs.json").read_text())
    chart = dt.draw_costs("lstm_costs", data, data_dir, img_dir=tmp_path)
    assert chart.is_file() and chart.stat().st_size > 0


def test_a_kind_without_a_time_is_an_error(data_dir):
    dt = _docs_tables()
    data = json.loads((data_dir / "lstm_costs.json").read_text())
    data["mix"]["msam"] = {"untimed_kind": 1.0}
    with pytest.raises(SystemExit, match="no time for step kind"):
        dt.cost_points(data, data_dir)


def test_a_configuration_run_on_one_seed_is_no_point_of_the_chart(data_dir):
    dt = _docs_tables()
    data = json.loads((data_dir / "lstm_costs.json").read_text())
    data["summary"]["msam"]["seeds"] = [0]  # a tuning-grid point: seed 0 only
    assert "msam" not in {p["method"] for p in dt.cost_points(data, data_dir)}
    assert "| msam |" not in dt.render_costs(data, data_dir)


def test_the_tuned_table_pairs_each_method_with_tuned_sam(tmp_path):
    """A compare --tune folder's data set: chosen settings and search cost from tune.json, and
    Δ test vs tuned SAM paired by seed with its t-interval (scipy's t quantile)."""
    from scipy import stats

    test = {"adamw": [6.0, 6.1, 6.3], "sam": [5.6, 5.75, 5.8], "wsam": [5.7, 5.76, 5.95]}
    comparison = _comparison(tmp_path / "cmp", test)
    space = [{"key": "optim.rho", "kind": "log", "low": 0.02, "high": 1.0, "choices": []}]
    tune = {
        "meta": {"spaces": {"sam": space, "wsam": space}},
        "methods": {
            m: {"best": {"params": {"optim.rho": rho}, "value": test[m][0] - 0.1},
                "trials": [{}] * 6, "pruned": pruned, "steps_run": steps, "full_run_steps": 4}
            for m, rho, pruned, steps in (("sam", 0.1, 4, 12), ("wsam", 0.02, 1, 21))
        },
    }  # fmt: skip
    dt = _docs_tables()
    data = dt.extract(dt.load_results(comparison), tune=tune)
    diffs = [w - s for w, s in zip(test["wsam"], test["sam"], strict=True)]
    mean = sum(diffs) / 3
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / 3**0.5
    d = data["deltas_vs_sam"]["wsam"]
    assert d["mean"] == pytest.approx(mean, abs=1e-12)
    assert (d["t_low"], d["t_high"]) == pytest.approx((mean - half, mean + half), abs=1e-12)
    assert "sam" not in data["deltas_vs_sam"]
    table = dt.render_tuned(data)
    wsam = next(line for line in table.splitlines() if line.startswith("| wsam |"))
    assert "| rho 0.02–1 log | 6 (1) | 5.25 | rho 0.02 | 5.6000 |" in wsam
    sam = next(line for line in table.splitlines() if line.startswith("| sam |"))
    assert sam.endswith("| – | – |")
    # AdamW tuned too (its lr): the baseline row, paired with tuned SAM
    lr = [{"key": "optim.lr", "kind": "log", "low": 1e-3, "high": 0.1, "choices": []}]
    tune["meta"]["spaces"]["adamw"] = lr
    tune["methods"]["adamw"] = {"best": {"params": {"optim.lr": 0.03}, "value": 5.9},
                                "trials": [{}] * 4, "pruned": 1, "steps_run": 13,
                                "full_run_steps": 4}  # fmt: skip
    table = dt.render_tuned(dt.extract(dt.load_results(comparison), tune=tune))
    adamw = next(line for line in table.splitlines() if line.startswith("| adamw |"))
    assert "| lr 0.001–0.1 log | 4 (1) | 3.25 | lr 0.03 | 5.9000 | – | baseline" in adamw
    assert adamw.endswith("| +0.4167 [+0.2269, +0.6064] | worse |")  # AdamW − SAM
    # a listed space (one lr held at another study's choice) shows its values to 3 digits
    lr = [{"key": "optim.lr", "kind": "cat", "low": None, "high": None,
           "choices": [0.0026643960791019957, 0.01]}]  # fmt: skip
    tune["meta"]["spaces"]["wsam"] = lr + space
    table = dt.render_tuned(dt.extract(dt.load_results(comparison), tune=tune))
    assert "| wsam | lr {0.00266, 0.01}; rho 0.02–1 log |" in table

    # SAM from another comparison with the same AdamW runs (--reference); refused otherwise
    other = _comparison(tmp_path / "other", {"adamw": test["adamw"], "bsam": [5.9, 6.0, 6.1]})
    tune["meta"]["spaces"]["bsam"] = space
    tune["methods"] = {"bsam": tune["methods"]["wsam"]}
    paired = dt.extract(dt.load_results(other), tune=tune, reference=dt.load_results(comparison))
    diffs = [b - s for b, s in zip([5.9, 6.0, 6.1], test["sam"], strict=True)]
    assert paired["deltas_vs_sam"]["bsam"]["mean"] == pytest.approx(sum(diffs) / 3, abs=1e-12)
    unlike = _comparison(tmp_path / "unlike", {"adamw": [6.0, 6.1, 6.31], "bsam": [5.9, 6, 6.1]})
    with pytest.raises(SystemExit, match="other AdamW runs"):
        dt.extract(dt.load_results(unlike), tune=tune, reference=dt.load_results(comparison))


def _comparison(folder: Path, test: dict[str, list[float]]) -> Path:
    """A comparison folder whose runs have these test losses (seeds 0, 1, 2), and its report."""
    from flatlm.lm.report import run_dir, write_report

    (folder / "runs").mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"methods": list(test), "jobs": 1}))
    for method, losses in test.items():
        for seed, v in enumerate(losses):
            run = run_dir(folder, method, seed)
            run.mkdir()
            result = {
                "method": method, "seed": seed, "status": "completed", "step": 4, "steps": 4,
                "val_loss": v - 0.1, "test_loss": v, "val_ppl": 1.0, "test_ppl": 1.0,
                "time_per_step_s": 0.01, "train_time_s": 0.04, "skipped_steps": 0,
            }  # fmt: skip
            (run / "result.json").write_text(json.dumps(result))
    write_report(folder)
    return folder


def test_best_runs_puts_several_comparisons_in_one_and_refuses_unlike_adamw(tmp_path):
    spec = importlib.util.spec_from_file_location("best_runs", ROOT / "scripts" / "best_runs.py")
    best_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(best_runs)
    adamw = [6.0, 6.1, 6.3]
    a = _comparison(tmp_path / "a", {"adamw": adamw, "sam": [5.6, 5.75, 5.8]})
    b = _comparison(tmp_path / "b", {"adamw": adamw, "bsam": [5.9, 6.0, 6.1]})
    out = tmp_path / "all"
    assert best_runs.main([str(out), f"{a}:adamw", f"{a}:sam", f"{b}:bsam"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == ["adamw", "sam", "bsam"]
    bsam = results["deltas_vs_adamw"]["bsam"]["test"]
    assert bsam["mean"] == pytest.approx(
        sum(x - y for x, y in zip([5.9, 6.0, 6.1], adamw, strict=True)) / 3
    )
    c = _comparison(tmp_path / "c", {"adamw": [6.0, 6.1, 6.29], "gsam": [5.7, 5.8, 5.9]})
    with pytest.raises(SystemExit, match="holds other adamw runs"):
        best_runs.main([str(tmp_path / "x"), f"{a}:adamw", f"{c}:gsam"])
    assert not (tmp_path / "x").exists()
