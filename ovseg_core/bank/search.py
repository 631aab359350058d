"""Nearest bank regions of each query (the reference's ``_faiss_search``), and exact re-ranking.

The reference searches the inner IVF-PQ on a GPU with ``nprobe = min(256, nlist)``, maps
internal positions to region ids through ``id_map`` (positions < 0 -> -1) and ignores the
distances. Here the search runs on CPUs. For the authors' "reference" IVF-PQ (L2 codes under an
inner-product coarse quantizer) FAISS's own CPU search cannot use its precomputed tables and
computes a d-dimensional residual table for every probed list; ``SearchConfig.search =
"precomputed"`` returns the same neighbours much faster:

1. the coarse quantizer's own inner-product search picks the same ``nprobe`` lists, in the
   same order, as FAISS's search;
2. each list's coarse term is turned into the squared L2 distance FAISS would start from,
   ||q - c||^2 = ||q||^2 + ||c||^2 - 2 <q, c>;
3. ``search_preassigned`` with the IVF-PQ's precomputed table (||r||^2 + 2 <c, r> per list and
   code, built once) adds -2 <q, r> per code: the same squared L2 distance of q to c + r, up to
   float rounding.

Step 1 (the coarse step, nlist x D multiply-adds per query) is one BLAS matrix product of the
queries with a view of the quantizer's centroids, then the top ``nprobe`` per query
(:func:`coarse_lists`): FAISS's flat search takes its non-BLAS loop below
``faiss.cvar.distance_compute_blas_threshold`` queries (128,000 in faiss-cpu 1.15), ~7x slower at 25
queries x 13,623 centroids; the two differ only in float rounding of the inner products. An HNSW
coarse quantizer (``IndexConfig.coarse``) is searched with efSearch = max(coarse_ef_search, nprobe).

Deviations for speed (off by default; docs/banks.md section 2): ``SearchConfig.coarse_dtype =
"bfloat16"`` computes the coarse step's product in bfloat16 (torch) and re-scores the best
``coarse_refine * nprobe`` lists in float32 (:func:`_coarse_lists_bf16`); an ``"ivfpq_fastscan"``
index (4-bit codes) is searched through the same preassigned path, with the precomputed table for
L2 codes and FAISS's per-query tables for inner-product codes.

The table costs nlist * m * 2**nbits float32 (446 MB for the 2.9M-region COCO bank). The path
switches the IVF-PQ's ``use_precomputed_table`` on for the call and off again, so one
:class:`BankIndex` must not be searched from two threads at once.
"""

from __future__ import annotations

import numpy as np
import torch

from ovseg_core.bank.config import SearchConfig
from ovseg_core.bank.faiss_import import faiss
from ovseg_core.bank.index_object import KEY_EPS, BankIndex, normalize_keys
from ovseg_core.bank.refine import rerank_positions
from ovseg_core.bank.rows import RowReader

__all__ = ["coarse_lists", "nprobe", "rerank", "search_index"]


def nprobe(bank: BankIndex, cfg: SearchConfig) -> int | None:
    """``min(nprobe_max, nlist)`` for an IVF index (the reference), else None."""
    return None if bank.nlist is None else min(cfg.nprobe_max, bank.nlist)


def _ensure_table(bank: BankIndex) -> None:
    inner = bank.inner
    if inner.by_residual and inner.metric_type == faiss.METRIC_L2 and inner.precomputed_table.size() == 0:
        inner.use_precomputed_table = 1  # forced: FAISS picks 0 (no table) for an inner-product quantizer
        try:
            inner.precompute_table()
        finally:
            inner.use_precomputed_table = 0


def _coarse_hnsw_params(cfg: SearchConfig, probes: int) -> "faiss.SearchParametersHNSW":
    """An HNSW coarse quantizer's search parameters: efSearch = max(``cfg.coarse_ef_search``, nprobe)."""
    return faiss.SearchParametersHNSW(efSearch=max(cfg.coarse_ef_search or probes, probes))


def coarse_lists(bank: BankIndex, queries: np.ndarray, probes: int, cfg: SearchConfig = SearchConfig()) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, lists)``, each ``(R, probes)``: the lists an IVF query probes, highest inner product first.

    Flat coarse quantizer: exact (``queries @ centroids.T`` in one BLAS call, ties by list
    number). HNSW: the graph's search with efSearch = max(``cfg.coarse_ef_search``, probes)
    (lists -1 where the graph returned fewer).
    """
    if bank.coarse == "hnsw":
        return bank.inner.quantizer.search(queries, probes, params=_coarse_hnsw_params(cfg, probes))
    if cfg.coarse_dtype == "bfloat16":
        return _coarse_lists_bf16(bank, queries, probes, cfg.coarse_refine)
    return _top_lists(queries @ bank.centroids().T, probes)


def _top_lists(sims: np.ndarray, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sims, lists)`` of the ``probes`` highest of ``sims`` ``(R, n)`` per row, highest first, ties by column."""
    if probes < sims.shape[1]:
        top = np.sort(np.argpartition(-sims, probes - 1, axis=1)[:, :probes], axis=1)
    else:
        top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    top_sims = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1).astype(np.int64)


def _coarse_lists_bf16(bank: BankIndex, queries: np.ndarray, probes: int, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`coarse_lists` from a bfloat16 product (``SearchConfig.coarse_dtype``), re-scored in float32.

    The best ``refine * probes`` lists by ``bf16(queries) @ bf16(centroids).T`` (torch; float32
    accumulation, bfloat16 result) are re-scored by float32 inner products with their centroids and
    the best ``probes`` of them kept (ties by list number); ``refine = 0`` keeps the bfloat16 top
    ``probes`` and their bfloat16 scores. A list whose float32 score is among the true top ``probes``
    is missed only when the bfloat16 rounding (~2**-8 relative) moves it below the candidates.
    """
    with torch.no_grad():
        approx = (torch.from_numpy(queries).to(torch.bfloat16) @ bank.centroids_bf16().T).float().numpy()
    if not refine:
        return _top_lists(approx, probes)
    _, cand = _top_lists(approx, min(refine * probes, approx.shape[1]))
    cand.sort(axis=1)  # list number order: the float32 selection below breaks ties by list number
    centroids = bank.centroids()
    sims = np.stack([centroids[lists] @ q for q, lists in zip(queries, cand)])  # one gemv per query: no (R, C, D) copy
    top_sims, pos = _top_lists(sims, probes)
    return top_sims, np.take_along_axis(cand, pos, axis=1)


def _coarse_distances(bank: BankIndex, queries: np.ndarray, sims: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The coarse term FAISS starts a list's code distances from: squared L2 ||q - c||^2 for an L2 IVF
    (the reference's metric), the inner product <q, c> for an inner-product IVF; +-inf where a list is -1."""
    if bank.inner.metric_type == faiss.METRIC_INNER_PRODUCT:
        return np.where(lists < 0, np.float32(-np.inf), sims).astype(np.float32)
    norms = bank.centroid_norms()
    coarse = (queries**2).sum(axis=1, keepdims=True) + norms[np.maximum(lists, 0)] - 2.0 * sims
    return np.where(lists < 0, np.float32(np.inf), coarse).astype(np.float32)


def _search_preassigned(bank: BankIndex, queries: np.ndarray, k: int, probes: int, cfg: SearchConfig) -> np.ndarray:
    """Positions (internal ids) of the k nearest codes, as FAISS's own search of this IVF-PQ returns.

    The lists come from :func:`coarse_lists`; an L2 IVF by residual ranks codes with the forced
    precomputed table (module doc), an inner-product one with FAISS's query tables.
    """
    _ensure_table(bank)
    inner = bank.inner
    sims, lists = coarse_lists(bank, queries, probes, cfg)
    coarse = _coarse_distances(bank, queries, sims, lists)
    inner.nprobe = probes  # the wrapper checks the assignment's width against it (the reference sets it too)
    inner.use_precomputed_table = int(inner.precomputed_table.size() > 0)
    implem = inner.implem if bank.kind == "ivfpq_fastscan" else None
    if implem is not None:
        inner.implem = cfg.fastscan_implem
    try:
        _, positions = inner.search_preassigned(queries, k, lists, coarse)
    finally:
        inner.use_precomputed_table = 0
        if implem is not None:
            inner.implem = implem
    return positions


def _ids_from_positions(bank: BankIndex, positions: np.ndarray) -> np.ndarray:
    id_map = bank.id_map()
    return np.where(positions >= 0, id_map[np.clip(positions, 0, max(id_map.shape[0] - 1, 0))], -1)


def _preassigned(bank: BankIndex, cfg: SearchConfig) -> bool:
    """Whether ``bank`` is searched through :func:`_search_preassigned` (the fast CPU path)."""
    return bank.kind == "ivfpq_fastscan" or (
        bank.kind == "ivfpq" and bank.metric == "reference" and bank.inner.by_residual and cfg.search == "precomputed"
    )


def _search_raw(bank: BankIndex, queries: np.ndarray, k: int, cfg: SearchConfig) -> np.ndarray:
    if bank.ntotal == 0:
        return np.full((queries.shape[0], k), -1, dtype=np.int64)
    probes = nprobe(bank, cfg)
    if _preassigned(bank, cfg):
        if cfg.coarse_dtype != "float32" and bank.coarse != "flat":
            raise ValueError(f"SearchConfig.coarse_dtype={cfg.coarse_dtype!r} needs a flat coarse quantizer, got {bank.coarse!r}")
        return _ids_from_positions(bank, _search_preassigned(bank, queries, k, probes, cfg))
    if cfg.coarse_dtype != "float32":
        raise ValueError(
            f"SearchConfig.coarse_dtype={cfg.coarse_dtype!r} needs an IVF-PQ searched with search='precomputed' "
            f"(or an 'ivfpq_fastscan' index), got kind {bank.kind!r}, metric {bank.metric!r}, search {cfg.search!r}"
        )
    if bank.kind == "ivfpq":
        coarse_params = _coarse_hnsw_params(cfg, probes) if bank.coarse == "hnsw" else None
        params = faiss.SearchParametersIVF(nprobe=probes, quantizer_params=coarse_params)
    elif bank.kind == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(cfg.hnsw_ef_search, k))
    else:
        params = None
    _, ids = bank.index.search(queries, k, params=params)
    return ids.astype(np.int64)


def rerank(queries: np.ndarray, candidates: np.ndarray, key_rows: RowReader, k: int) -> np.ndarray:
    """Keep the ``k`` candidates of each query with the highest exact cosine to its stored key.

    Args:
        queries: ``(R, D) float32`` unit queries.
        candidates: ``(R, C) int64`` region ids from the index (-1 = none).
        key_rows: the bank's key store (fp16 keys, normalised here as the index normalises them).
        k: neighbours kept.
    Returns:
        ``(R, k) int64``, best first; -1 where fewer than k candidates exist. Ties keep the
        index's order.
    """
    r, c = candidates.shape
    valid = candidates >= 0
    flat = candidates[valid]
    scores = np.full((r, c), -np.inf, dtype=np.float32)
    if flat.size:
        keys = np.asarray(key_rows.rows(flat), dtype=np.float32)
        norms = np.sqrt(np.einsum("nd,nd->n", keys, keys))
        if not np.isfinite(norms).all():
            normalize_keys(keys)  # raises, naming the NaN/Inf rows
        rows = np.repeat(np.arange(r), valid.sum(axis=1))
        # <q, k / (||k|| + 1e-12)> as the index normalises keys, without a normalised copy of the rows
        scores[valid] = np.einsum("nd,nd->n", keys, queries[rows]) / (norms + np.float32(KEY_EPS))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(candidates, order, axis=1)
    out[np.take_along_axis(scores, order, axis=1) == -np.inf] = -1
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((r, k - out.shape[1]), -1, dtype=np.int64)], axis=1)
    return out


def _rerank_with_codes(bank: BankIndex, queries: np.ndarray, cfg: SearchConfig) -> np.ndarray:
    """``SearchConfig.rerank_with="codes"``: candidates from the index, re-scored with its in-RAM residual codes."""
    if bank.refine is None or not _preassigned(bank, cfg) or bank.coarse != "flat":
        raise ValueError(
            "SearchConfig.rerank_with='codes' needs an IVF-PQ searched by the preassigned path (kind 'ivfpq_fastscan', or "
            "'ivfpq' with metric 'reference' and search 'precomputed') with a flat coarse quantizer and re-ranking codes "
            f"(IndexConfig.refine_m > 0); got kind {bank.kind!r}, coarse {bank.coarse!r}, codes {bank.refine is not None}"
        )
    if bank.ntotal == 0:
        return np.full((queries.shape[0], cfg.k), -1, dtype=np.int64)
    candidates = _search_preassigned(bank, queries, max(cfg.rerank_candidates, cfg.k), nprobe(bank, cfg), cfg)
    return _ids_from_positions(bank, rerank_positions(bank.refine, bank.centroids(), queries, candidates, cfg.k))


def search_index(
    bank: BankIndex, queries: np.ndarray, cfg: SearchConfig = SearchConfig(), key_rows: RowReader | None = None
) -> np.ndarray:
    """Region ids of the ``cfg.k`` nearest bank keys of each query.

    Args:
        bank: the index.
        queries: ``(R, D) float32`` L2-normalised queries (:func:`ovseg_core.bank.pooling.region_queries`).
        cfg: k, nprobe, search path, re-ranking.
        key_rows: the key store; required when ``cfg.rerank``.
    Returns:
        ``(R, k) int64`` region ids, nearest first; -1 where the index returned fewer than k.
    Raises:
        ValueError: bad query shape, or ``cfg.rerank`` without ``key_rows``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != bank.dim:
        raise ValueError(f"queries must be (R, {bank.dim}) float32, got shape {queries.shape}")
    if not cfg.rerank:
        return _search_raw(bank, queries, cfg.k, cfg)
    if cfg.rerank_with == "codes":
        return _rerank_with_codes(bank, queries, cfg)
    if key_rows is None:
        raise ValueError("SearchConfig.rerank needs the bank's key store (key_rows) to re-score candidates; without one "
                         "(the pipeline serves no key store) re-rank with in-RAM codes: rerank_with='codes' and an index "
                         "built with IndexConfig.refine_m")
    candidates = _search_raw(bank, queries, max(cfg.rerank_candidates, cfg.k), cfg)
    return rerank(queries, candidates, key_rows, cfg.k)
