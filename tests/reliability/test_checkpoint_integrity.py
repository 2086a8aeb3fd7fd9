"""Item 3: a checkpoint carries its SHA-256 and is verified on load (``torch.load`` does not
check the zip's CRCs). A damaged latest checkpoint falls back to the previous one with a warning;
both damaged is a clear error."""

from __future__ import annotations

import random
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from flatlm.lm.checkpoint import CheckpointError, load_checkpoint, previous_checkpoint
from flatlm.lm.train import train

SETTINGS = {"optim__method": "sam", "train__steps": 6, "train__checkpoint_every": 2}


def _flip(path: Path, positions: list[int], masks: list[int] | None = None) -> None:
    """XOR the bytes at ``positions`` with non-zero masks (each byte really changes)."""
    data = bytearray(path.read_bytes())
    for i, pos in enumerate(positions):
        data[pos] ^= masks[i] if masks else 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def cut_run(tiny_cfg, tmp_path) -> Path:
    """A SAM run stopped after step 4: checkpoint.pt at step 4, checkpoint.prev.pt at step 2."""
    train(tiny_cfg(**SETTINGS), tmp_path / "cut", quiet=True, stop_after=4)
    return tmp_path / "cut"


@pytest.mark.parametrize("flips", [1, 4000])
def test_a_damaged_latest_checkpoint_falls_back_and_resumes_exactly(
    tiny_cfg, tmp_path, cut_run, flips
):
    latest = cut_run / "checkpoint.pt"
    positions = random.Random(flips).sample(range(latest.stat().st_size), flips)
    _flip(latest, positions)
    with pytest.raises(CheckpointError, match=r"SHA-256 does not match|checksum is gone"):
        load_checkpoint(latest)
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        resumed = train(tiny_cfg(**SETTINGS), cut_run, quiet=True, resume=True)
    train(tiny_cfg(**SETTINGS), tmp_path / "straight", quiet=True)
    assert resumed["status"] == "completed" and resumed["skipped_steps"] == 0
    a = load_checkpoint(cut_run / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_both_checkpoints_damaged_is_a_clear_error_naming_both(tiny_cfg, cut_run):
    latest = cut_run / "checkpoint.pt"
    for path in (latest, previous_checkpoint(latest)):
        _flip(path, [path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is corrupt.*previous one.*prev"):
        train(tiny_cfg(**SETTINGS), cut_run, quiet=True, resume=True)


def test_a_checkpoint_is_still_a_plain_torch_file(cut_run):
    plain = torch.load(cut_run / "checkpoint.pt", weights_only=True)  # the digest is a zip comment
    assert plain["step"] == 4 and plain.keys() == load_checkpoint(cut_run / "checkpoint.pt").keys()


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(cut_run, tmp_path):
    legacy = tmp_path / "legacy.pt"  # as flatlm wrote them before checksums
    torch.save(load_checkpoint(cut_run / "checkpoint.pt"), legacy)
    with pytest.warns(UserWarning, match="has no checksum .*not verified"):
        assert load_checkpoint(legacy)["step"] == 4


@pytest.fixture(scope="module")
def sealed(tmp_path_factory) -> bytes:
    """The bytes of a real checkpoint (a small model, optimizer state, metrics)."""
    from flatlm.lm.checkpoint import RunState, save_checkpoint
    from flatlm.lm.config import RunConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = RunState(model, opt, sched, torch.Generator(), torch.device("cpu"), step=3)

    class FakeCorpus:  # save_checkpoint reads only these two
        vocab_size, fingerprint = 8, "0123456789abcdef"

    path = tmp_path_factory.mktemp("sealed") / "checkpoint.pt"
    save_checkpoint(path, run, RunConfig(), FakeCorpus(), [{"step": 1, "loss": 2.0}])
    return path.read_bytes()


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same cases on every run: the suite stays deterministic
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_random_flipped_bytes_are_always_detected(sealed, tmp_path, data):
    size = len(sealed)
    # Anywhere in the file, or in its last record and digest, where a bug would hide best.
    region = data.draw(st.sampled_from([(0, size - 1), (size - 200, size - 1)]), label="region")
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(*region), st.integers(1, 255)),
            min_size=1,
            max_size=40,
            unique_by=lambda t: t[0],
        ),
        label="flips",
    )
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(sealed)
    _flip(path, [pos for pos, _ in flips], [mask for _, mask in flips])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0, 1, 21, 22, 100, -79, -78, -1])
def test_a_truncated_checkpoint_is_detected(sealed, tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(sealed[:keep])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
