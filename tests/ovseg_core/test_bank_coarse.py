"""The coarse step of an IVF-PQ search (ovseg_core.bank.search.coarse_lists) and the HNSW coarse quantizer option."""

from __future__ import annotations

import io

import faiss
import numpy as np
import pytest

from ovseg_core.bank.config import IndexConfig, SearchConfig
from ovseg_core.bank.index import add_keys, build_index, index_from_bytes, index_to_bytes, use_hnsw_coarse
from ovseg_core.bank.search import coarse_lists, search_index
from tests.ovseg_core.bank_keys import clustered_keys, unit_rows


def _lists(bank) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, codes) of every inverted list, copied."""
    inv, size = bank.inner.invlists, bank.inner.code_size
    out = []
    for lst in range(bank.nlist):
        n = inv.list_size(lst)
        out.append((faiss.rev_swig_ptr(inv.get_ids(lst), n).copy(), faiss.rev_swig_ptr(inv.get_codes(lst), n * size).copy()))
    return out


@pytest.fixture(scope="module")
def data():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64) * 2 + 5
    yield keys, ids, unit_rows(clustered_keys(100, seed=7)), build_index(keys, ids)
    faiss.omp_set_num_threads(before)


def test_coarse_step_is_the_exact_top_nprobe_by_inner_product(data):
    _, _, queries, bank = data
    centroids = bank.inner.quantizer.reconstruct_n(0, bank.nlist)  # FAISS's copy, not the view coarse_lists reads
    sims = queries.astype(np.float64) @ centroids.astype(np.float64).T
    for probes in (1, 16, bank.nlist):
        got_sims, lists = coarse_lists(bank, queries, probes)
        expected = np.argsort(-sims, axis=1, kind="stable")[:, :probes]
        np.testing.assert_array_equal(lists, expected)
        np.testing.assert_allclose(got_sims, np.take_along_axis(sims, expected, 1), rtol=1e-5, atol=1e-6)


def test_default_search_returns_faiss_own_neighbours(data):
    """The BLAS coarse step changes nothing but float rounding: FAISS's own search (its own flat quantizer search) agrees."""
    _, _, queries, bank = data
    for probes in (16, 256):
        fast = search_index(bank, queries, SearchConfig(nprobe_max=probes))
        own = search_index(bank, queries, SearchConfig(nprobe_max=probes, search="faiss"))
        np.testing.assert_array_equal(fast, own)


def test_hnsw_coarse_keeps_lists_and_codes_and_finds_the_flat_neighbours(data):
    keys, ids, queries, flat = data
    hnsw = build_index(keys, ids, IndexConfig(coarse="hnsw"))
    assert (flat.coarse, hnsw.coarse) == ("flat", "hnsw")
    assert isinstance(faiss.downcast_index(hnsw.inner.quantizer), faiss.IndexHNSWFlat)
    for (fi, fc), (hi, hc) in zip(_lists(flat), _lists(hnsw)):
        np.testing.assert_array_equal(fi, hi)
        np.testing.assert_array_equal(fc, hc)
    np.testing.assert_array_equal(hnsw.centroids(), flat.centroids())
    # every list probed: the HNSW graph returns every centroid, so the search is the flat one's
    every = SearchConfig(nprobe_max=flat.nlist)
    np.testing.assert_array_equal(search_index(hnsw, queries, every), search_index(flat, queries, every))
    # the reference's nprobe 256: approximate coarse step, nearly always the same neighbours
    found, exact = search_index(hnsw, queries), search_index(flat, queries)
    assert (found == exact).all(axis=1).mean() >= 0.9
    # FAISS's own search path reads the HNSW beam too
    np.testing.assert_array_equal(search_index(hnsw, queries, SearchConfig(nprobe_max=16, coarse_ef_search=64, search="faiss")),
                                  search_index(hnsw, queries, SearchConfig(nprobe_max=16, coarse_ef_search=64)))


def test_hnsw_coarse_round_trip_and_exact_assignment_when_keys_are_added(data):
    keys, ids, queries, _ = data
    flat = build_index(keys[:2000], ids[:2000])
    hnsw = build_index(keys[:2000], ids[:2000], IndexConfig(coarse="hnsw"))
    assert add_keys(flat, keys[2000:], ids[2000:]) == add_keys(hnsw, keys[2000:], ids[2000:]) == 1000
    assert hnsw.coarse == "hnsw"  # the graph is back after the adds
    for (fi, fc), (hi, hc) in zip(_lists(flat), _lists(hnsw)):  # new keys went to their nearest list, exactly
        np.testing.assert_array_equal(fi, hi)
        np.testing.assert_array_equal(fc, hc)
    loaded = index_from_bytes(index_to_bytes(hnsw), reverse_map=False)
    assert loaded.coarse == "hnsw" and loaded.ntotal == 3000
    cfg = SearchConfig(coarse_ef_search=300)
    np.testing.assert_array_equal(search_index(loaded, queries, cfg), search_index(hnsw, queries, cfg))
    with pytest.raises(ValueError, match="flat coarse quantizer"):
        use_hnsw_coarse(loaded)


def test_hnsw_coarse_graph_is_deterministic_with_several_threads(data):
    """FAISS inserts HNSW nodes in parallel; use_hnsw_coarse builds on one thread whatever the setting."""
    flat_bytes = index_to_bytes(data[3])
    faiss.omp_set_num_threads(2)
    try:
        a, b = (index_to_bytes(use_hnsw_coarse(index_from_bytes(flat_bytes))) for _ in range(2))
        assert faiss.omp_get_max_threads() == 2  # restored
    finally:
        faiss.omp_set_num_threads(1)
    assert a == b
    assert io.BytesIO(a).read(4) == b"IxM2"


def test_coarse_option_errors():
    with pytest.raises(ValueError, match="IndexConfig.coarse must be one of"):
        IndexConfig(coarse="ivf")
    with pytest.raises(ValueError, match="IndexConfig.coarse='hnsw' needs kind 'ivfpq'"):
        IndexConfig(kind="flat", coarse="hnsw")
    with pytest.raises(ValueError, match="IndexConfig.coarse_hnsw_m"):
        IndexConfig(coarse="hnsw", coarse_hnsw_m=1)
    with pytest.raises(ValueError, match="IndexConfig.coarse_hnsw_ef_construction"):
        IndexConfig(coarse_hnsw_ef_construction=0)
    with pytest.raises(ValueError, match="SearchConfig.coarse_ef_search"):
        SearchConfig(coarse_ef_search=0)
