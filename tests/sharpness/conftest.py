"""Fixtures: small float64 models with their loss and batches."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from sharpness_refs import Case, make_gpt, make_linear, make_mlp


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
