"""Shared fixtures: repository paths, the embedded sample, and the optional shared data."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture
def small_disk(tmp_path, request) -> Path:
    """A tmpfs mounted for the test, 64 MiB unless parametrized (``indirect=True``) with another ``size=``
    (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    size = getattr(request, "param", "64m")
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {got.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path: Path, leave: int = 0) -> None:
    """Take the free space of ``path``'s file system but ``leave`` bytes (a file ``filler`` in ``path``)."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


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
