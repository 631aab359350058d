"""Shared fixtures: repository paths, the embedded sample, and the optional shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "data"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The embedded real sample (VOC, ADE20K, Cityscapes, CamVid subsets) shipped in the repo."""
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` when present (larger CamVid sample); tests needing it skip otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (only the embedded sample is available)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _thread_count_restored():
    """Every test leaves torch's thread count as it found it.

    ``faiss.omp_set_num_threads`` (the bank tests) sets the OpenMP thread count of the whole process, torch's
    included (one libgomp); a later test computing in this process would run at another thread count than its
    reference and differ in the last bits.
    """
    import torch  # noqa: PLC0415 - here, not at the top: collecting the tests must not wait for torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
