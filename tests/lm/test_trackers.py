"""Trackers (``train.log``): the metric files as before, TensorBoard and W&B hold the records,
a resume continues them, and a missing package names the extra that installs it."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from flatlm._extras import MissingExtraError
from flatlm.lm.config import ConfigError
from flatlm.lm.trackers import (
    CsvTracker,
    JsonlTracker,
    make_trackers,
    scalars,
)
from flatlm.lm.train import train


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_scalars(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every number of every record, tag "<split>/<key>"."""
    out: dict[tuple[str, int], float] = {}
    for r in records:
        for key, value in r.items():
            if key not in ("step", "split") and isinstance(value, int | float):
                out[(f"{r['split']}/{key}", r["step"])] = float(value)
    return out


# ----------------------------------------------------------------------------- files


def test_jsonl_and_csv_are_rewritten_from_the_resumed_history(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    assert cfg.train.log == ["jsonl", "csv"]  # the default, whatever is installed
    train(cfg, tmp_path, quiet=True, stop_after=3)
    # a record past the checkpoint, as a kill -9 after a flush would leave it
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "split": "train", "loss": 9.0}) + "\n")
    train(cfg, tmp_path, quiet=True, resume=True)
    records = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["metrics"]
    # the final checkpoint's records, then the test loss computed after it, in the format
    # flatlm always wrote: the stray step-4 record is gone
    records.append(_records(tmp_path)[-1])
    assert records[-1]["split"] == "test"
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(
        json.dumps(r) + "\n" for r in records
    )
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert list(rows[0]) == ["step", "split", "loss", "ppl", "lr", "elapsed_s"]
    assert [(int(r["step"]), r["split"], float(r["loss"])) for r in rows] == [
        (r["step"], r["split"], r["loss"]) for r in records
    ]
    assert not (tmp_path / "tb").exists() and not (tmp_path / "wandb").exists()


def test_the_file_trackers_keep_their_history_and_write_on_flush(tmp_path):
    history = [{"step": 0, "split": "val", "loss": 2.0, "ppl": 7.4, "elapsed_s": 0.0}]
    jsonl, table = JsonlTracker(tmp_path, history), CsvTracker(tmp_path, history)
    record = {"step": 1, "split": "train", "loss": 1.5, "lr": 0.1, "elapsed_s": 0.2}
    for t in (jsonl, table):
        t.add(record)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing before a flush
    jsonl.flush()
    table.close()
    assert _records(tmp_path) == [*history, record]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "step,split,loss,ppl,lr,elapsed_s",
        "0,val,2.0,7.4,,0.0",
        "1,train,1.5,,0.1,0.2",
    ]


def test_a_resume_may_change_the_trackers_and_a_file_not_logged_is_removed(tiny_cfg, tmp_path):
    train(tiny_cfg(), tmp_path, quiet=True, stop_after=3)
    assert (tmp_path / "metrics.csv").is_file()
    result = train(tiny_cfg(train__log=["jsonl"]), tmp_path, quiet=True, resume=True)
    assert result["status"] == "completed"
    assert result["setting_changes"] == [
        {"step": 3, "key": "train.log", "was": ["jsonl", "csv"], "now": ["jsonl"]}
    ]
    assert not (tmp_path / "metrics.csv").exists()  # it would describe the first 3 steps only


def test_scalars_are_the_numbers_of_a_record() -> None:
    record = {"step": 4, "split": "sharpness", "loss": 1.0, "hessian.lambda_max": 3,
              "sam.logit_functional_ratio": None, "flag": True, "note": "x"}  # fmt: skip
    assert scalars(record) == {"sharpness/loss": 1.0, "sharpness/hessian.lambda_max": 3.0}


# ----------------------------------------------------------------------------- config


def test_unknown_tracker_names_the_known_ones(tiny_cfg):
    with pytest.raises(ConfigError, match=r"train\.log\[1\]': unknown tracker 'tensorbord' "
                       r"\(known: 'jsonl', 'csv', 'tensorboard', 'wandb'\)"):  # fmt: skip
        tiny_cfg(train__log=["jsonl", "tensorbord"])
    with pytest.raises(ConfigError, match="must include 'jsonl'"):
        tiny_cfg(train__log=["csv"])
    with pytest.raises(ConfigError, match="must not repeat"):
        tiny_cfg(train__log=["jsonl", "jsonl"])
    with pytest.raises(ConfigError, match=r"train\.wandb_mode' must be one of"):
        tiny_cfg(train__wandb_mode="sometimes")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_names_its_extra(tiny_cfg, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: import and find_spec fail
    how = f"pip install 'flatlm[{name}]'"
    with pytest.raises(ConfigError, match=rf"train.log' names '{name}'.*{how}".replace("[", r"\[")):
        tiny_cfg(train__log=["jsonl", name])
    # a config that skipped validation (the API) stops at the run's start, before any file
    cfg = tiny_cfg()
    cfg.train.log = ["jsonl", name]
    with pytest.raises(MissingExtraError, match=how.replace("[", r"\[")) as e:
        train(cfg, tmp_path / "run", quiet=True)
    assert e.value.extra == name
    assert not (tmp_path / "run").exists()


def test_only_rank_0_streams(tmp_path, monkeypatch):
    # the other ranks' folders are throwaway: files only, no writer, no W&B run (nor its import)
    monkeypatch.setattr("flatlm.lm.trackers.missing_package", lambda name: None)
    trackers = make_trackers(
        ["jsonl", "csv", "tensorboard", "wandb"], tmp_path, [], config={}, start_step=0,
        resume=False, rank=1,
    )  # fmt: skip
    assert [type(t).__name__ for t in trackers] == ["JsonlTracker", "CsvTracker"]


# ----------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_the_records_after_a_resume(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(train__log=["jsonl", "csv", "tensorboard"])
    train(cfg, tmp_path, quiet=True, stop_after=3)
    train(cfg, tmp_path, quiet=True, resume=True)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = {
        (tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)
    }
    expected = _expected_scalars(_records(tmp_path))
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6), key  # stored as float32
    # each (tag, step) once: the steps of the first part were not logged again
    count = sum(len(events.Scalars(tag)) for tag in events.Tags()["scalars"])
    assert count == len(expected)


# ----------------------------------------------------------------------------- W&B


def _wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks; each chunk: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, chunks, out = 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            out.append(record)
            chunks = []
    return out


def _wandb_run(path: Path) -> tuple[str, dict[str, Any], dict[tuple[str, int], float]]:
    """A W&B offline run file's run id, config and history as (key, step) -> value."""
    run_id, config, history = "", {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            step = row.pop("_step")
            history |= {(k, step): v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, history


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """W&B offline, silent, with every folder of its own in tmp_path; its service process is
    stopped afterwards (it outlives runs), and none is left."""
    wandb = pytest.importorskip("wandb")
    before = _children()
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(var, value)
    yield wandb
    wandb.teardown()
    assert _children() <= before, "W&B left a process running"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child pids from /proc")
def test_wandb_offline_run_holds_the_records_and_a_resume_continues_it(
    tiny_cfg, tmp_path, offline_wandb
):
    cfg = tiny_cfg(train__log=["jsonl", "wandb"], train__wandb_project="flatlm-test")
    out = tmp_path / "sam-s0"
    train(cfg, out, quiet=True, stop_after=3)
    run_id = (out / "wandb_id.txt").read_text().strip()
    train(cfg, out, quiet=True, resume=True)
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one offline run per process, both with the id: W&B joins them
    history: dict[tuple[str, int], float] = {}
    for path in files:
        rid, config, part = _wandb_run(path)
        assert rid == run_id
        assert config["train"]["steps"] == 6 and config["optim"]["method"] == "adamw"
        assert all(history[k] == v for k, v in part.items() if k in history)  # the same numbers
        history |= part
    expected = _expected_scalars(_records(out))
    assert history.keys() == expected.keys() == part.keys()  # the resumed file holds them all
    for key, value in expected.items():
        assert history[key] == pytest.approx(value, rel=1e-12), key
    # a fresh run (no --resume) in the folder, once its run is gone, is a new W&B run
    for name in ("result.json", "checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).unlink(missing_ok=True)
    train(cfg, out, quiet=True)
    assert (out / "wandb_id.txt").read_text().strip() != run_id


def test_an_error_closes_the_trackers_as_failed_and_is_the_one_raised(
    tiny_cfg, tmp_path, monkeypatch
):
    import flatlm.lm.train as train_mod

    closed: list[bool] = []

    class Broken:
        def add(self, record: dict[str, Any]) -> None:
            pass

        def flush(self) -> None:
            pass

        def close(self, ok: bool = True) -> None:
            closed.append(ok)
            raise RuntimeError("the tracker's own close failed")

    def step(*args: Any, **kwargs: Any) -> None:
        raise ValueError("boom in step 1")

    monkeypatch.setattr(train_mod, "make_trackers", lambda *a, **k: [Broken(), Broken()])
    monkeypatch.setattr(train_mod, "train_step", step)
    with pytest.raises(ValueError, match="boom in step 1"):
        train(tiny_cfg(), tmp_path, quiet=True)
    assert closed == [False, False]  # every tracker, though the first one's close raised
