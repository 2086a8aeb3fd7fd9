"""Fixtures: small float64 models with their loss and batches; optional backends skip cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sharpness_refs import Case, make_gpt, make_linear, make_mlp

from flatlm._extras import MissingExtraError

# Optional backends that no flatlm extra installs (docs/install.md): a test that reaches one of
# them while it is not installed is skipped with the install hint, never failed.
OPTIONAL_BACKENDS = ("curvlinops",)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except MissingExtraError as e:
        if e.module.split(".")[0] not in OPTIONAL_BACKENDS:
            raise
        pytest.skip(f"optional backend {e.module} is not installed: {e}")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: with a shared, loaded 2-core machine, intra-op threads only add
    synchronisation (measured 50x slower products). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["mlp", "gpt"])
def case(request: pytest.FixtureRequest) -> Case:
    return {"mlp": make_mlp, "gpt": make_gpt}[request.param]()


@pytest.fixture
def mlp_case() -> Case:
    return make_mlp()


@pytest.fixture
def gpt_case() -> Case:
    return make_gpt()


@pytest.fixture
def linear_case() -> Case:
    return make_linear()
