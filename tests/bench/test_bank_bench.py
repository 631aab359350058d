"""The memory-bank benchmark (``bench/bank.py``): stand-in helpers and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bank
    import bank_standin

    faiss.omp_set_num_threads(1)
    return bank, bank_standin


def test_standin_is_deterministic_clustered_and_exact_search_is_exact(bench, tmp_path, monkeypatch):
    _, standin = bench
    spec = standin.Spec(3000, dim_key=64, dim_main=32, dim_aux=16, seed=2)
    monkeypatch.setattr(standin, "GROUPS_PER_BATCH", 40)  # several batches
    folder = standin.generate(spec, tmp_path)
    keys = np.load(folder / "keys.npy")
    assert keys.shape == (3000, 64) and keys.dtype == np.float16
    norms = np.linalg.norm(keys.astype(np.float32), axis=1)
    assert norms.min() > 0.5 and norms.max() < 0.96  # means of unit vectors: norm < 1
    coarse = np.load(folder / "coarse.npy")
    assert coarse.max() < spec.coarse
    again = standin.generate(spec, tmp_path / "again")  # a function of the spec
    np.testing.assert_array_equal(np.load(again / "keys.npy"), keys)
    np.testing.assert_array_equal(np.load(again / "main.npy"), np.load(folder / "main.npy"))
    q = standin.queries(folder, 30, seed=0)
    unit = keys.astype(np.float32) / np.linalg.norm(keys.astype(np.float32), axis=1, keepdims=True)
    expected = np.argsort(-(q @ unit.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(standin.exact_topk(folder, q, 10, chunk=512), expected)


def test_structured_index_has_the_reference_structure_and_lists_match_nearest_centroids(bench, tmp_path):
    _, standin = bench
    spec = standin.Spec(4000, dim_key=64, dim_main=32, dim_aux=16)
    folder = standin.generate(spec, tmp_path)
    index, info = standin.structured_index(folder, spec, chunk=1500)
    inner = faiss.downcast_index(index.index)
    assert index.ntotal == 4000 and inner.nlist == spec.coarse == int(8 * np.sqrt(4000))
    assert inner.metric_type == faiss.METRIC_L2 and inner.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    assert info["list_agreement"] > 0.99
    assert faiss.vector_to_array(index.id_map).tolist() == list(range(4000))


def test_fastscan_variant_keeps_every_key_in_its_list_of_the_source_index(bench, tmp_path):
    _, standin = bench
    spec = standin.Spec(4000, dim_key=64, dim_main=32, dim_aux=16)
    folder = standin.generate(spec, tmp_path)
    index, _ = standin.structured_index(folder, spec, chunk=1500)
    source = faiss.downcast_index(index.index)
    fast_map, info = standin.fastscan_from(source, folder, 32, chunk=1500)
    fast = faiss.downcast_index(fast_map.index)
    assert isinstance(fast, faiss.IndexIVFPQFastScan) and (fast.pq.M, fast.pq.nbits, fast.nlist) == (32, 4, source.nlist)
    assert fast_map.ntotal == fast.ntotal == 4000 and faiss.vector_to_array(fast_map.id_map).tolist() == list(range(4000))
    for lst in range(source.nlist):
        n = source.invlists.list_size(lst)
        assert fast.invlists.list_size(lst) == n
        ids = sorted(faiss.rev_swig_ptr(source.invlists.get_ids(lst), n).tolist()) if n else []
        got = sorted(faiss.rev_swig_ptr(fast.invlists.get_ids(lst), n).tolist()) if n else []
        assert got == ids
    q = standin.queries(folder, 20, seed=0)
    fast.nprobe = source.nlist  # every list: the 4-bit codes still find the true nearest key of most queries
    _, found = fast_map.search(q, 10)
    assert np.mean([e in f for e, f in zip(standin.exact_topk(folder, q, 1)[:, 0], found)]) >= 0.8


def test_recall_counts_the_exact_neighbours_found(bench):
    bank, _ = bench
    assert bank.recall(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[2, 1, 3], [7, 8, 9]])) == pytest.approx(1 / 3)
    with pytest.raises(SystemExit):
        bank.parse_args(["--regions", "0"])
    with pytest.raises(SystemExit):
        bank.parse_args(["--dims", "100", "8", "8"])
    with pytest.raises(SystemExit):
        bank.parse_args(["--dims", "64", "8", "8", "--refine-m", "48"])
    assert bank.parse_args(["--dims", "64", "8", "8"]).refine_m == [32]
    assert bank.parse_args([]).refine_m == [128]


def test_tiny_benchmark_run_prints_the_table(bench, tmp_path, capsys):
    bank, _ = bench
    res = bank.main(["--regions", "3000", "--dims", "64", "32", "16", "--images", "3", "--recall-images", "2",
                     "--size", "48", "48", "--classes", "7", "--readers", "mmap", "pread", "--build", "structured",
                     "--build-threads", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| retrieval + fusion per image (reader: mmap), wall / CPU ms | <= 5 ms |" in text
    hnsw = "pread, HNSW coarse nprobe 16 ef 64"
    fast = "pread, FastScan m 64 IP, bfloat16 coarse, exact re-rank of 40"
    assert set(res["serving"]) == {"mmap", "pread", hnsw, fast}
    for reader, out in res["serving"].items():
        coarse = "hnsw" if reader == hnsw else "flat"
        kind, metric = ("ivfpq_fastscan", "inner_product") if reader == fast else ("ivfpq", "reference")
        assert out["index"] == {"kind": kind, "metric": metric, "coarse": coarse, "nlist": int(8 * np.sqrt(3000)),
                                "ntotal": 3000}
        assert out["ms"]["total"] > 0 and out["cpu_ms"]["retrieval"] > 0 and out["memory"]["served"]["VmRSS"] > 0
        assert out["ms"]["logits_pass"] > 0  # the fusion's floor: timed beside the steps, not one of them
    assert "| floor of the fusion alone: one in-place pass over the 7 x 48 x 48 float32 logits" in text
    timed_only = [o["option"] for o in res["options"] if "recall" not in o]  # rows that time a part of the search
    assert timed_only and all(n.startswith("coarse step only:") for n in timed_only)
    assert all(0.0 <= o["recall"] <= 1.0 for o in res["options"] if "recall" in o)
    assert any("codes" in o["option"] and "recall" in o for o in res["options"])  # the in-RAM re-ranking rows
    assert any(o["option"].startswith("HNSW coarse") for o in res["options"])
    assert next(o for o in res["options"] if "(before)" in o["option"])["same_neighbours_as_default"] is True
    assert next(o for o in res["options"] if "float32 re-score" in o["option"])["same_neighbours_as_default"] is True
    assert set(res["bf16_same_lists"]) == {"refine 0", "refine 1", "refine 2"} and res["bf16_same_lists"]["refine 2"] == 1.0
    assert "FastScan" in text and "bfloat16 coarse step, fraction of queries" in text
    assert json.loads((tmp_path / "bank-n3000.json").read_text())["args"]["regions"] == 3000
    assert (tmp_path / "bank-n3000.md").read_text().startswith("# Memory-bank benchmark")
