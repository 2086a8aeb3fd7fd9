"""scripts/mutation_check.py stays in step with the code: each planted bug's text occurs exactly
once in its file (so a refactor that moves the code fails here, in every run, and not only when
someone runs the mutation check), and the tests it names exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mutations():
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts/mutation_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = _mutations()


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_to_exactly_one_place(mutation):
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.old) == 1, f"update the mutation {mutation.name!r}: the code moved"
    for test in mutation.tests:
        assert (ROOT / test.split("::")[0]).is_file(), test
