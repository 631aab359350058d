"""The authors' prebuilt bank files: `.pt` stores streamed in chunks, `.faiss` index (ovseg_core.bank.authors_format)."""

from __future__ import annotations

import io
import math

import faiss
import numpy as np
import pytest
import torch

from ovseg_core.bank.authors_format import check_id_coverage, check_pt_layout, iter_pt_rows, read_pt_layout
from ovseg_core.bank.config import SearchConfig
from ovseg_core.bank.index import index_from_file
from ovseg_core.bank.rows import ArrayRows
from ovseg_core.bank.search import search_index

N, D_KEY, D_VALUE = 1200, 64, 32


class CountingFile(io.FileIO):
    """A file that records the size of every read."""

    def __init__(self, path):
        super().__init__(path, "rb")
        self.reads: list[int] = []

    def read(self, size=-1):
        data = super().read(size)
        self.reads.append(len(data))
        return data

    def readinto(self, b):
        n = super().readinto(b)
        self.reads.append(n)
        return n


def _authors_index(keys: np.ndarray) -> faiss.Index:
    """`update_faiss_cache` of the reference, first build: normalise, IVF-PQ without metric, add ids."""
    vecs = keys.astype(np.float32)
    vecs = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12)
    vecs = np.ascontiguousarray(vecs, dtype="float32")
    nlist = max(1, int(8 * np.sqrt(len(vecs))))
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(D_KEY), D_KEY, nlist, 32, 8)
    ivf.train(vecs)
    index = faiss.IndexIDMap2(ivf)
    index.add_with_ids(vecs, np.arange(len(vecs), dtype="int64"))
    return index


def _authors_search(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """`_faiss_search` of the reference, on a CPU copy: inner index, nprobe = min(256, nlist), id_map."""
    inner = faiss.downcast_index(index.index)
    inner.nprobe = min(256, inner.nlist)
    _, positions = inner.search(queries, k)
    id_map = faiss.vector_to_array(index.id_map).astype("int64")
    return np.where(positions >= 0, id_map[np.clip(positions, 0, id_map.shape[0] - 1)], -1)


@pytest.fixture(scope="module")
def authors_bank(tmp_path_factory):
    faiss.omp_set_num_threads(1)
    root = tmp_path_factory.mktemp("memory_bank")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, D_KEY))
    keys = centres[rng.integers(0, 30, N)] + 0.8 * rng.standard_normal((N, D_KEY))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True) * 0.8).astype(np.float16)
    values = rng.standard_normal((N, D_VALUE)).astype(np.float16)
    # pt_store.finalize: torch.save(torch.from_numpy(array)) of the [N, D] fp16 memmap contents
    torch.save(torch.from_numpy(keys), root / "synth_radiov3.pt")
    torch.save(torch.from_numpy(values), root / "synth_metaclip_b.pt")
    index = _authors_index(keys)
    faiss.write_index(index, str(root / "synth_radiov3.faiss"))
    queries = keys[rng.integers(0, N, 10)].astype(np.float32) + 0.05 * rng.standard_normal((10, D_KEY)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return root, keys, values, index, queries


def test_store_layout_and_chunks_equal_torch_load(authors_bank):
    root, keys, values, _, _ = authors_bank
    with CountingFile(root / "synth_metaclip_b.pt") as f:
        layout = read_pt_layout(f)
        assert (layout.rows, layout.dim, layout.dtype) == (N, D_VALUE, np.float16)
        assert sum(f.reads) < 64 * 1024 < values.nbytes  # the pickle and the directory, not the rows
        f.reads.clear()
        chunks = list(iter_pt_rows(f, layout, chunk_rows=500))
        assert [start for start, _ in chunks] == [0, 500, 1000]
        assert max(f.reads) <= 500 * D_VALUE * 2  # never more than one chunk at a time
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), values)
    full = torch.load(root / "synth_metaclip_b.pt", weights_only=True)
    mapped = torch.load(root / "synth_metaclip_b.pt", weights_only=True, mmap=True)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), full.numpy())
    np.testing.assert_array_equal(mapped[[5, 999]].numpy(), values[[5, 999]])
    check_pt_layout(layout, rows=N, dim=D_VALUE)
    with pytest.raises(ValueError, match=r"1200 rows, expected 1300; dimension 32, expected 512"):
        check_pt_layout(layout, rows=N + 100, dim=512)


def test_imported_index_returns_the_authors_neighbours(authors_bank):
    root, keys, values, index, queries = authors_bank
    with open(root / "synth_radiov3.faiss", "rb") as f:
        bank = index_from_file(f)
    assert bank.kind == "ivfpq" and bank.metric == "reference" and bank.nlist == int(8 * math.sqrt(N))
    expected = _authors_search(index, queries, 20)
    np.testing.assert_array_equal(search_index(bank, queries, SearchConfig()), expected)
    np.testing.assert_array_equal(search_index(bank, queries, SearchConfig(search="faiss")), expected)
    assert check_id_coverage(bank.ids(), N).complete
    # values read through the imported rows are the authors' rows
    with open(root / "synth_metaclip_b.pt", "rb") as f:
        layout = read_pt_layout(f)
        imported = np.concatenate([c for _, c in iter_pt_rows(f, layout)])
    ids = expected[expected >= 0]
    np.testing.assert_array_equal(ArrayRows(imported).rows(ids), values[ids])


def test_id_coverage_finds_missing_duplicated_and_foreign_ids():
    cov = check_id_coverage(np.array([0, 1, 1, 3, 7, -1]), 5)
    assert (cov.indexed, cov.missing, cov.duplicated, cov.out_of_range) == (6, 2, 1, 2)
    assert not cov.complete
    assert check_id_coverage(np.arange(4)[::-1], 4).complete


def test_bad_store_files_are_rejected(tmp_path):
    torch.save({"a": torch.zeros(2, 2)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(5), tmp_path / "vec.pt")
    torch.save(torch.zeros(4, 6, dtype=torch.float16)[:, :3], tmp_path / "view.pt")
    torch.save(torch.zeros(4, 3), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(torch.zeros(400, 8, dtype=torch.float16), tmp_path / "big.pt")
    data = (tmp_path / "big.pt").read_bytes()
    cut = data.index(b"PK\x01\x02")  # keep the directory, drop the tail of the tensor record
    (tmp_path / "trunc.pt").write_bytes(data[: cut - 3000] + data[cut:])
    cases = {"dict.pt": "holds dict", "vec.pt": r"holds \(5,\)", "view.pt": "strided view", "legacy.pt": "BadZipFile"}
    for name, msg in cases.items():
        with open(tmp_path / name, "rb") as f, pytest.raises(ValueError, match=msg):
            read_pt_layout(f)
    with open(tmp_path / "trunc.pt", "rb") as f, pytest.raises(ValueError, match="not an authors' bank store"):
        read_pt_layout(f)
    with open(tmp_path / "big.pt", "rb") as f:
        layout = read_pt_layout(f)
        check_pt_layout(layout, rows=400, dim=8)
        with pytest.raises(ValueError, match="dtype float16, expected float32"):
            check_pt_layout(layout, dtype="float32")
