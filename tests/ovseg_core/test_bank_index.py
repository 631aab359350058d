"""The bank index: build, search, re-rank, extend, serialise (ovseg_core.bank.index / search)."""

from __future__ import annotations

import io
import math

import faiss
import numpy as np
import pytest
import torch

from ovseg_core.bank.config import IndexConfig, SearchConfig
from ovseg_core.bank.index import (
    BankIndex,
    add_keys,
    build_index,
    index_from_bytes,
    index_from_file,
    index_to_bytes,
    new_index,
    plan_extension,
    train_index,
    training_ids,
)
from ovseg_core.bank.rows import ArrayRows
from ovseg_core.bank.search import nprobe, search_index
from tests.ovseg_core.bank_keys import D, clustered_keys, unit_rows


def _brute_force(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by inner product of unit keys (numpy; ties broken by position)."""
    sims = queries @ unit_rows(keys).T
    return ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads spin against each other on a shared 2-core machine (6x slower)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def bank_data(one_faiss_thread):
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64) * 3 + 11  # region ids need not be row numbers
    queries = unit_rows(clustered_keys(12, seed=5))
    return keys, ids, queries, build_index(keys, ids)


def test_reference_structure_nlist_and_metric_quirk(bank_data):
    keys, _, _, bank = bank_data
    assert bank.kind == "ivfpq" and bank.metric == "reference"
    assert bank.nlist == int(8 * math.sqrt(3000))
    assert bank.inner.metric_type == faiss.METRIC_L2  # built without a metric argument
    assert bank.inner.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    assert (bank.inner.pq.M, bank.inner.pq.nbits) == (32, 8)
    assert nprobe(bank, SearchConfig()) == min(256, bank.nlist)
    assert nprobe(bank, SearchConfig(nprobe_max=7)) == 7


def test_flat_index_equals_brute_force(bank_data):
    keys, ids, queries, _ = bank_data
    flat = build_index(keys, ids, IndexConfig(kind="flat"))
    assert flat.kind == "flat"
    np.testing.assert_array_equal(search_index(flat, queries, SearchConfig(k=20)), _brute_force(keys, ids, queries, 20))


def test_ivfpq_search_with_all_lists_equals_brute_force_over_decoded_codes(bank_data):
    """With every list probed, IVF-PQ ranks by squared L2 to centroid + decoded residual."""
    keys, ids, queries, bank = bank_data
    inner = bank.inner
    lists = faiss.extract_index_ivf(inner).invlists
    positions, recon = [], []
    centroids = inner.quantizer.reconstruct_n(0, inner.nlist)
    for lst in range(inner.nlist):
        n = lists.list_size(lst)
        if n == 0:
            continue
        codes = faiss.rev_swig_ptr(lists.get_codes(lst), n * inner.code_size).copy().reshape(n, inner.code_size)
        positions.append(faiss.rev_swig_ptr(lists.get_ids(lst), n).copy())
        recon.append(centroids[lst] + inner.pq.decode(codes))
    positions, recon = np.concatenate(positions), np.concatenate(recon)
    d2 = ((queries[:, None, :] - recon[None]) ** 2).sum(-1)
    expected = bank.ids()[positions[np.argsort(d2, axis=1, kind="stable")[:, :20]]]
    cfg = SearchConfig(k=20, nprobe_max=bank.nlist)
    np.testing.assert_array_equal(search_index(bank, queries, cfg), expected)
    np.testing.assert_array_equal(search_index(bank, queries, SearchConfig(k=20, nprobe_max=bank.nlist, search="faiss")), expected)


def test_precomputed_path_returns_faiss_own_neighbours_at_default_nprobe(bank_data):
    _, _, queries, bank = bank_data
    for k in (1, 20):
        fast = search_index(bank, queries, SearchConfig(k=k, nprobe_max=16))
        own = search_index(bank, queries, SearchConfig(k=k, nprobe_max=16, search="faiss"))
        np.testing.assert_array_equal(fast, own)
    assert bank.inner.use_precomputed_table == 0  # FAISS's own search stays correct afterwards


def test_rerank_over_all_candidates_is_exact(bank_data):
    keys, ids, queries, bank = bank_data
    rows = ArrayRows(np.zeros((ids.max() + 1, D), dtype=np.float16))
    rows.array[ids] = keys
    cfg = SearchConfig(k=20, rerank=True, rerank_candidates=3000, nprobe_max=bank.nlist)
    np.testing.assert_array_equal(search_index(bank, queries, cfg, key_rows=rows), _brute_force(keys, ids, queries, 20))
    with pytest.raises(ValueError, match="key_rows"):
        search_index(bank, queries, SearchConfig(rerank=True))


def test_inner_product_and_hnsw_options(bank_data):
    keys, ids, queries, _ = bank_data
    ip = build_index(keys, ids, IndexConfig(metric="inner_product"))
    assert ip.metric == "inner_product" and ip.inner.metric_type == faiss.METRIC_INNER_PRODUCT
    hnsw = build_index(keys, ids, IndexConfig(kind="hnsw"))
    assert hnsw.kind == "hnsw"
    exact = _brute_force(keys, ids, queries, 20)
    found = search_index(hnsw, queries, SearchConfig(k=20))
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found, exact)])
    assert recall >= 0.9


def test_tiny_bank_falls_back_to_exact_flat_search():
    keys = clustered_keys(255)
    cfg = IndexConfig()
    assert cfg.min_ivfpq_regions == 256
    bank = build_index(keys, cfg=cfg)
    assert bank.kind == "flat"
    queries = unit_rows(clustered_keys(4, seed=3))
    np.testing.assert_array_equal(search_index(bank, queries, SearchConfig(k=20)), _brute_force(keys, np.arange(255), queries, 20))
    assert build_index(clustered_keys(256), cfg=cfg).kind == "ivfpq"
    # a grown tiny bank is rebuilt as the configured kind
    assert plan_extension(bank, n_trained=255, n_total=300, cfg=cfg) == "rebuild"


def test_extension_add_keeps_training_retrain_rebuilds(bank_data):
    keys, ids, queries, _ = bank_data
    base = build_index(keys[:2000], ids[:2000])
    nlist = base.nlist
    assert plan_extension(base, 2000, 3000, IndexConfig()) == "add"  # the reference never retrains
    assert add_keys(base, keys[2000:], ids[2000:]) == 1000
    assert base.ntotal == 3000 and base.nlist == nlist
    assert set(search_index(base, queries).ravel()) <= set(ids)
    retrain = IndexConfig(extension="retrain", retrain_growth=0.25)
    assert plan_extension(base, 2000, 2400, retrain) == "add"
    assert plan_extension(base, 2000, 2600, retrain) == "rebuild"
    assert build_index(keys, ids, retrain).nlist == int(8 * math.sqrt(3000)) != nlist


def test_add_keys_rejects_bad_ids_and_nan_keys_skips_zero_keys(bank_data):
    keys, ids, _, _ = bank_data
    bank = build_index(keys[:1000], ids[:1000])
    with pytest.raises(ValueError, match="already in the index"):
        add_keys(bank, keys[:2], ids[:2])
    with pytest.raises(ValueError, match="distinct"):
        add_keys(bank, keys[1000:1002], np.array([5, 5]))
    bad = keys[1000:1003].copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="empty_region='zero'"):
        add_keys(bank, bad, np.array([1, 2, 4]))
    zero = keys[1000:1003].copy()
    zero[0] = 0
    assert add_keys(bank, zero, np.array([1, 2, 4])) == 2
    assert 1 not in set(bank.ids().tolist())
    with pytest.raises(ValueError, match="NaN"):
        build_index(bad)


def test_serialisation_round_trip_and_faiss_file_bytes(bank_data, tmp_path):
    _, _, queries, bank = bank_data
    data = index_to_bytes(bank)
    faiss.write_index(bank.index, str(tmp_path / "x.faiss"))
    assert (tmp_path / "x.faiss").read_bytes() == data  # the same bytes as faiss.write_index
    for loaded in (index_from_bytes(data), index_from_file(io.BytesIO(data))):
        assert loaded.kind == "ivfpq" and loaded.metric == "reference"
        np.testing.assert_array_equal(search_index(loaded, queries), search_index(bank, queries))
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        index_from_bytes(b"garbage")


def test_training_sample_and_config_errors():
    assert training_ids(10).tolist() == list(range(10))
    sample = training_ids(1000, IndexConfig(train_size=300))
    assert sample.size == 300 and np.all(np.diff(sample) > 0)
    np.testing.assert_array_equal(sample, training_ids(1000, IndexConfig(train_size=300)))
    with pytest.raises(ValueError, match="does not divide"):
        new_index(48, 1000, IndexConfig(pq_m=32))
    bank = new_index(D, 5000, IndexConfig())
    with pytest.raises(ValueError, match="train_size"):
        train_index(bank, clustered_keys(300))
    with pytest.raises(ValueError, match="not trained"):
        add_keys(bank, clustered_keys(3), np.arange(3))
    with pytest.raises(ValueError, match="IndexConfig.kind"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="SearchConfig.k"):
        SearchConfig(k=0)
    with pytest.raises(ValueError, match="IndexFlat"):
        BankIndex(faiss.IndexIDMap2(faiss.IndexLSH(D, 16)))


def test_faiss_and_torch_in_one_process():
    """faiss-cpu and torch share the process (both bring OpenMP runtimes)."""
    x = torch.randn(200, D).numpy()
    index = faiss.IndexFlatIP(D)
    index.add(x)
    _, i = index.search(x[:3], 1)
    assert i.ravel().tolist() == [0, 1, 2]
    assert torch.allclose(torch.from_numpy(x[:3]) @ torch.from_numpy(x[:3]).T, torch.from_numpy(x[:3] @ x[:3].T), atol=1e-4)


def test_serving_index_without_reverse_map_searches_the_same(bank_data):
    _, ids, queries, bank = bank_data
    data = index_to_bytes(bank)
    served = index_from_bytes(data, reverse_map=False)
    assert isinstance(served.index, faiss.IndexIDMap) and not isinstance(served.index, faiss.IndexIDMap2)
    assert served.kind == "ivfpq" and served.metric == "reference" and served.ntotal == 3000
    np.testing.assert_array_equal(served.ids(), ids)
    np.testing.assert_array_equal(search_index(served, queries), search_index(bank, queries))
    again = index_from_file(io.BytesIO(index_to_bytes(served)))
    np.testing.assert_array_equal(search_index(again, queries), search_index(bank, queries))
    assert isinstance(index_from_bytes(data).index, faiss.IndexIDMap2)
