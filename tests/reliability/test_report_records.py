"""``flatlm report`` reads every record of a comparison folder; one damaged or cut short (a
truncated ``metrics.jsonl``, ``result.json`` or ``compare.json``) is a one-line error naming
the file and line, never a traceback and never a report that silently says less."""

from __future__ import annotations

import pytest

from flatlm import cli
from flatlm.lm.compare import compare


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("runs/sam-s0/metrics.jsonl", "line 3 is damaged or cut short"),
        ("runs/sam-s0/result.json", "is damaged or cut short"),
        ("compare.json", "is damaged or cut short"),
    ],
)
def test_a_damaged_record_is_named(name, where, tiny_cfg, tmp_path, capsys):
    compare(tiny_cfg(train__steps=2), tmp_path, ["adamw", "sam"], [0], quiet=True)
    path = tmp_path / name
    text = path.read_text()
    if name.endswith(".jsonl"):  # cut in the middle of its third line
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:2]) + lines[2][: len(lines[2]) // 2]
    else:
        text = text[: len(text) // 2]
    path.write_text(text)
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flatlm report: error: {path} {where} (") and err.count("\n") == 1


def test_a_record_without_its_keys_is_named(tiny_cfg, tmp_path, capsys):
    compare(tiny_cfg(train__steps=2), tmp_path, ["adamw"], [0], quiet=True)
    path = tmp_path / "runs/adamw-s0/metrics.jsonl"
    path.write_text(path.read_text() + '{"loss": 1.0}\n[1, 2]\n')
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line" in err and "(no 'step', 'split')" in err
