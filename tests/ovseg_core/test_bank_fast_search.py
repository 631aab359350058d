"""Faster-search options (not in the reference): the bfloat16 coarse step and the IVF-PQ FastScan index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from ovseg_core.bank.config import IndexConfig, SearchConfig
from ovseg_core.bank.index import build_index, index_from_bytes, index_to_bytes
from ovseg_core.bank.rows import ArrayRows
from ovseg_core.bank.search import coarse_lists, search_index
from tests.ovseg_core.bank_keys import clustered_keys, unit_rows


@pytest.fixture(scope="module")
def data():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64) * 3 + 1
    yield keys, ids, unit_rows(clustered_keys(100, seed=7)), build_index(keys, ids)
    faiss.omp_set_num_threads(before)


def _exact_top(queries: np.ndarray, vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, sims) of the n highest float64 inner products per query (ties by position)."""
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    return top, np.take_along_axis(sims, top, axis=1)


def test_bfloat16_coarse_step_with_refinement_probes_the_exact_lists(data):
    _, _, queries, bank = data
    centroids = bank.inner.quantizer.reconstruct_n(0, bank.nlist)
    for probes in (8, 64):
        expected, expected_sims = _exact_top(queries, centroids, probes)
        sims, lists = coarse_lists(bank, queries, probes, SearchConfig(coarse_dtype="bfloat16", coarse_refine=2))
        np.testing.assert_array_equal(lists, expected)
        np.testing.assert_allclose(sims, expected_sims, rtol=1e-5, atol=1e-6)


def test_bfloat16_coarse_step_without_refinement_is_within_bfloat16_rounding(data):
    _, _, queries, bank = data
    centroids = bank.inner.quantizer.reconstruct_n(0, bank.nlist)
    sims, lists = coarse_lists(bank, queries, 64, SearchConfig(coarse_dtype="bfloat16"))  # coarse_refine 0 by default
    exact = np.take_along_axis(queries.astype(np.float64) @ centroids.astype(np.float64).T, lists, axis=1)
    bound = 2.0**-7 * np.linalg.norm(centroids, axis=1)[lists]  # inputs and result rounded to 8 significant bits
    assert (np.abs(sims - exact) <= bound).all()
    assert (np.diff(sims, axis=1) <= 0).all()
    expected, _ = _exact_top(queries, centroids, 64)
    overlap = np.mean([len(set(a) & set(b)) / 64 for a, b in zip(lists, expected)])
    assert overlap > 0.9  # lists near the boundary may change (how many depends on torch's bfloat16 kernel)


def test_bfloat16_coarse_search_returns_the_default_neighbours(data):
    _, _, queries, bank = data
    for probes in (16, 256):
        default = search_index(bank, queries, SearchConfig(nprobe_max=probes))
        fast = search_index(bank, queries, SearchConfig(nprobe_max=probes, coarse_dtype="bfloat16", coarse_refine=2))
        np.testing.assert_array_equal(fast, default)


def test_bfloat16_coarse_step_is_rejected_where_it_does_not_apply(data):
    keys, ids, queries, bank = data
    with pytest.raises(ValueError, match="coarse_dtype='bfloat16' needs an IVF-PQ searched with search='precomputed'"):
        search_index(bank, queries, SearchConfig(coarse_dtype="bfloat16", search="faiss"))
    hnsw = build_index(keys, ids, IndexConfig(coarse="hnsw"))
    with pytest.raises(ValueError, match="needs a flat coarse quantizer, got 'hnsw'"):
        search_index(hnsw, queries, SearchConfig(coarse_dtype="bfloat16"))


@pytest.mark.parametrize("metric", ["reference", "inner_product"])
def test_fastscan_index_search_equals_faiss_own_and_survives_serialisation(data, metric):
    keys, ids, queries, _ = data
    fs = build_index(keys, ids, IndexConfig(kind="ivfpq_fastscan", pq_nbits=4, metric=metric))
    assert (fs.kind, fs.metric, fs.ntotal) == ("ivfpq_fastscan", metric, 3000)
    assert isinstance(faiss.downcast_index(fs.inner), faiss.IndexIVFPQFastScan)
    for probes in (4, 32):
        ours = search_index(fs, queries, SearchConfig(nprobe_max=probes))
        _, own = fs.index.search(queries, 20, params=faiss.SearchParametersIVF(nprobe=probes))
        np.testing.assert_array_equal(ours, own)
        assert np.isin(ours[ours >= 0], ids).all() and (ours[:, 0] >= 0).all()
        bf16 = search_index(fs, queries, SearchConfig(nprobe_max=probes, coarse_dtype="bfloat16", coarse_refine=2))
        np.testing.assert_array_equal(bf16, ours)
    again = index_from_bytes(index_to_bytes(fs))
    assert again.kind == "ivfpq_fastscan"
    np.testing.assert_array_equal(search_index(again, queries, SearchConfig(nprobe_max=32)), ours)


@pytest.mark.parametrize("metric", ["reference", "inner_product"])
def test_fastscan_with_exact_reranking_of_every_probed_code_is_exact_search(data, metric):
    """All lists probed and every code a candidate: the re-ranked result is the brute-force top k by cosine."""
    keys, ids, queries, _ = data
    fs = build_index(keys, ids, IndexConfig(kind="ivfpq_fastscan", pq_nbits=4, metric=metric))
    store = np.zeros((int(ids.max()) + 1, keys.shape[1]), np.float16)
    store[ids] = keys
    cfg = SearchConfig(nprobe_max=fs.nlist, rerank=True, rerank_candidates=3000, coarse_dtype="bfloat16", coarse_refine=0)
    found = search_index(fs, queries, cfg, ArrayRows(store))
    top, _ = _exact_top(queries, unit_rows(keys), 20)
    np.testing.assert_array_equal(found, ids[top])
    few = search_index(fs, queries, SearchConfig(nprobe_max=8), ArrayRows(store))
    assert (few != found).any()  # without re-ranking the 4-bit codes do not find the exact top k


def test_fast_search_options_are_validated():
    with pytest.raises(ValueError, match="kind='ivfpq_fastscan' needs pq_nbits=4"):
        IndexConfig(kind="ivfpq_fastscan")
    with pytest.raises(ValueError, match="SearchConfig.coarse_dtype must be one of"):
        SearchConfig(coarse_dtype="float16")
    with pytest.raises(ValueError, match="SearchConfig.coarse_refine must be >= 0"):
        SearchConfig(coarse_refine=-1)
    assert IndexConfig(kind="ivfpq_fastscan", pq_nbits=4, coarse="hnsw").coarse == "hnsw"
