"""In-RAM re-ranking codes (``SearchConfig.rerank_with="codes"``, ``IndexConfig.refine_m``) and FastScan implementations."""

from __future__ import annotations

from dataclasses import replace

import faiss
import numpy as np
import pytest

from ovseg_core.bank.config import IndexConfig, SearchConfig
from ovseg_core.bank.index import add_keys, build_index, plan_extension
from ovseg_core.bank.refine import RefineCodes, refine_scores
from ovseg_core.bank.rows import ArrayRows
from ovseg_core.bank.search import search_index
from tests.ovseg_core.bank_keys import clustered_keys, unit_rows

FAST = {"kind": "ivfpq_fastscan", "pq_nbits": 4, "metric": "inner_product"}


@pytest.fixture(scope="module")
def data():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64)[::-1] * 3 + 1  # ids not in position order
    queries = unit_rows(clustered_keys(100, seed=7))
    yield keys, ids, queries, build_index(keys, ids, IndexConfig(**FAST, refine_m=64))
    faiss.omp_set_num_threads(before)


def _decoded_scores(bank, keys, ids, queries):
    """Independently: every key's list (nearest... as stored), its residual code decoded from the codebook, and
    <q, c + r_hat> in float64 for every (query, position)."""
    codes = bank.refine
    m, ksub, dsub = codes.codebook.shape
    r_hat = np.concatenate([codes.codebook[j][codes.codes[:, j]] for j in range(m)], axis=1).astype(np.float64)
    centroids = bank.inner.quantizer.reconstruct_n(0, bank.nlist).astype(np.float64)
    approx = centroids[codes.lists] + r_hat
    return queries.astype(np.float64) @ approx.T


def test_codes_score_what_a_decoded_residual_scores(data):
    keys, ids, queries, bank = data
    codes = bank.refine
    assert codes.codes.shape == (3000, 64) and codes.codes.dtype == np.uint8 and codes.lists.shape == (3000,)
    positions = np.tile(np.arange(3000), (queries.shape[0], 1))
    positions[:, ::7] = -1
    got = refine_scores(codes, bank.centroids(), queries, positions)
    want = _decoded_scores(bank, keys, ids, queries)
    ok = positions >= 0
    np.testing.assert_allclose(got[ok], want[ok], atol=2e-5)
    assert (got[~ok] == -np.inf).all()
    # the decoded key is close to the stored unit key: a residual code, not a random one
    unit = unit_rows(keys)[np.argsort(ids)[np.searchsorted(np.sort(ids), bank.id_map())]]
    approx = bank.inner.quantizer.reconstruct_n(0, bank.nlist)[codes.lists] + np.concatenate(
        [codes.codebook[j][codes.codes[:, j]] for j in range(64)], axis=1)
    assert np.median(np.linalg.norm(approx - unit, axis=1)) < 0.3


def test_reranking_every_code_with_codes_keeps_the_best_decoded_scores_and_beats_the_4bit_scan(data):
    keys, ids, queries, bank = data
    cfg = SearchConfig(nprobe_max=bank.nlist, rerank=True, rerank_candidates=3000, rerank_with="codes")
    found = search_index(bank, queries, cfg)
    scores = _decoded_scores(bank, keys, ids, queries)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(found, bank.id_map()[best])
    exact = ids[np.argsort(-(queries @ unit_rows(keys).T), axis=1)[:, :20]]

    def recall(f):
        return np.mean([len(set(a) & set(e)) / 20 for a, e in zip(f, exact)])

    store = np.zeros((int(ids.max()) + 1, keys.shape[1]), np.float16)
    store[ids] = keys
    plain = search_index(bank, queries, SearchConfig(nprobe_max=64))
    cfg = SearchConfig(nprobe_max=64, rerank=True, rerank_candidates=100)
    reranked = search_index(bank, queries, replace(cfg, rerank_with="codes"))
    by_keys = search_index(bank, queries, cfg, ArrayRows(store))  # exact re-ranking: the ceiling at these candidates
    assert recall(reranked) > recall(plain) + 0.2 and recall(reranked) > recall(by_keys) - 0.05


def test_codes_survive_their_arrays_and_an_hnsw_coarse_build_keeps_them(data):
    keys, ids, queries, bank = data
    again = RefineCodes.from_arrays(bank.refine.arrays())
    np.testing.assert_array_equal(again.codes, bank.refine.codes)
    hnsw = build_index(keys, ids, IndexConfig(**FAST, refine_m=64, coarse="hnsw"))
    np.testing.assert_array_equal(hnsw.refine.codes, bank.refine.codes)  # same lists, same training: same codes


def test_fastscan_implementations_return_the_same_neighbours(data):
    _, _, queries, bank = data
    base = search_index(bank, queries, SearchConfig(nprobe_max=16))
    for implem in (10, 11, 12, 13, 14, 15):
        got = search_index(bank, queries, SearchConfig(nprobe_max=16, fastscan_implem=implem))
        overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(got, base)])  # ties of the 16-bit distances aside
        assert overlap > 0.97, implem
    assert bank.inner.implem == 0  # restored after the call


def test_codes_options_are_checked(data):
    keys, ids, queries, bank = data
    with pytest.raises(ValueError, match="SearchConfig.rerank_with must be one of"):
        SearchConfig(rerank_with="disk")
    with pytest.raises(ValueError, match="refine_m needs an IVF index"):
        IndexConfig(kind="flat", refine_m=8)
    with pytest.raises(ValueError, match="fastscan_implem"):
        SearchConfig(fastscan_implem=3)
    plain = build_index(keys, ids, IndexConfig(**FAST))
    assert plain.refine is None
    with pytest.raises(ValueError, match="re-ranking codes"):
        search_index(plain, queries, SearchConfig(rerank=True, rerank_with="codes"))
    with pytest.raises(ValueError, match="rebuild it"):
        add_keys(bank, keys[:2], np.array([10**6, 10**6 + 1]))
    assert plan_extension(bank, 3000, 3001, IndexConfig(**FAST, refine_m=64)) == "rebuild"
    assert plan_extension(plain, 3000, 3001, IndexConfig(**FAST)) == "add"
