"""The retrieval index over a bank's keys (VISR step 4, ``update_faiss_cache`` of the reference).

Default = the authors' index: keys -> float32, ``/ (norm + 1e-12)``, then
``IndexIDMap2(IndexIVFPQ(IndexFlatIP(d), d, nlist, m=32, nbits=8))`` with
nlist = max(1, int(8 * sqrt(N))), trained on all N keys, ``add_with_ids`` with the region ids.
The IVF-PQ is built **without a metric argument**, so FAISS makes it an L2 index over an
inner-product coarse quantizer (``IndexConfig.metric = "reference"``): k-means assigns by inner
product but keeps plain (unnormalised) centroids, lists are probed by inner product and codes
ranked by squared L2 of the residual. On unit vectors L2 order = IP order for exact distances,
so the quirk changes which lists are probed and the PQ training, not the notion of "near".

``IndexConfig.coarse = "hnsw"``: the same IVF-PQ (trained and filled with the flat quantizer, so
the same lists and codes) whose coarse quantizer is then replaced by an HNSW graph over the same
centroids (:func:`use_hnsw_coarse`): a query probes its approximately nearest ``nprobe`` lists
without scanning all nlist centroids. Keys added later are still assigned by exact search.

``IndexConfig.kind = "ivfpq_fastscan"`` (not in the reference): the same IVF with FAISS's
``IndexIVFPQFastScan`` (4-bit codes in SIMD-friendly blocks), trained and added the same way.

Extension: the reference adds new ids to the existing index without retraining; ``extension =
"retrain"`` rebuilds from all keys once the bank has grown by ``retrain_growth``
(:func:`plan_extension`). Tiny banks: see ``IndexConfig.min_ivfpq_regions``.

The index is the bank's only in-RAM structure; :func:`index_to_bytes` / :func:`index_from_bytes`
let storage write and read it atomically (``faiss.serialize_index`` format, the same bytes as
``faiss.write_index``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np

from ovseg_core.bank.config import IVF_KINDS, IndexConfig
from ovseg_core.bank.faiss_import import faiss
from ovseg_core.bank.index_object import BankIndex, normalize_keys
from ovseg_core.bank.refine import build_refine_codes

__all__ = [
    "BankIndex",
    "add_keys",
    "build_index",
    "use_hnsw_coarse",
    "index_from_bytes",
    "index_from_file",
    "index_to_bytes",
    "new_index",
    "normalize_keys",
    "plan_extension",
    "training_ids",
    "train_index",
]

# FAISS's serialisation tags of IndexIDMap2 and IndexIDMap.
_IDMAP2_TAG, _IDMAP_TAG = b"IxM2", b"IxMp"
# Rows per add_with_ids call when adding (bounds the float32 copy of the keys).
_ADD_CHUNK = 65536


def _nlist(n: int, cfg: IndexConfig) -> int:
    return max(1, int(cfg.nlist_factor * math.sqrt(n)))


def built_kind(n_total: int, cfg: IndexConfig) -> str:
    """The kind actually built for ``n_total`` keys (the tiny-bank rule: an IVF kind -> "flat")."""
    if cfg.kind in IVF_KINDS and n_total < cfg.min_ivfpq_regions:
        return "flat"
    return cfg.kind


def new_index(dim: int, n_total: int, cfg: IndexConfig = IndexConfig()) -> BankIndex:
    """An empty (untrained for IVF-PQ) index for a bank of ``n_total`` keys of dimension ``dim``.

    Raises:
        ValueError: ``pq_m`` does not divide ``dim`` (the reference raises the same), ``n_total < 1``.
    """
    if n_total < 1 or dim < 1:
        raise ValueError(f"an index needs n_total >= 1 keys of dim >= 1, got n_total={n_total}, dim={dim}")
    kind = built_kind(n_total, cfg)
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = cfg.hnsw_ef_construction
    else:
        if dim % cfg.pq_m:
            raise ValueError(f"IndexConfig.pq_m={cfg.pq_m} does not divide the key dimension {dim}; pick a divisor")
        quantizer = faiss.IndexFlatIP(dim)
        # no metric argument = L2 codes under the inner-product quantizer: the reference's quirk
        metric = faiss.METRIC_L2 if cfg.metric == "reference" else faiss.METRIC_INNER_PRODUCT
        ivf_class = faiss.IndexIVFPQ if kind == "ivfpq" else faiss.IndexIVFPQFastScan
        inner = ivf_class(quantizer, dim, _nlist(n_total, cfg), cfg.pq_m, cfg.pq_nbits, metric)
        inner.cp.seed = cfg.train_seed
        inner.pq.cp.seed = cfg.train_seed
    return BankIndex(faiss.IndexIDMap2(inner))


def training_ids(n_total: int, cfg: IndexConfig = IndexConfig()) -> np.ndarray:
    """``(n,) int64`` ascending positions (0..n_total-1) of the keys that train the index.

    All of them by default (the reference); a uniform sample of ``train_size`` (seed
    ``train_seed``) otherwise, so storage reads only those rows.
    """
    if cfg.train_size is None or cfg.train_size >= n_total:
        return np.arange(n_total, dtype=np.int64)
    rng = np.random.default_rng(cfg.train_seed)
    return np.sort(rng.choice(n_total, size=cfg.train_size, replace=False)).astype(np.int64)


def train_index(bank: BankIndex, keys: np.ndarray) -> None:
    """Train an IVF-PQ (or its FastScan variant) on ``keys`` ``(n, D)`` (normalised here); a no-op for flat and HNSW.

    Raises:
        ValueError: fewer training keys than the index needs (nlist centroids, 2**nbits PQ codes).
    """
    if bank.kind not in IVF_KINDS:
        return
    vecs = normalize_keys(keys)
    need = max(int(bank.inner.nlist), 2 ** int(bank.inner.pq.nbits))
    if vecs.shape[0] < need:
        raise ValueError(
            f"training an IVF-PQ with nlist={bank.inner.nlist}, nbits={bank.inner.pq.nbits} needs >= {need} keys, "
            f"got {vecs.shape[0]}; raise IndexConfig.train_size"
        )
    bank.index.train(vecs)  # trains the IVF-PQ and marks the IndexIDMap2 trained


def add_keys(bank: BankIndex, keys: np.ndarray, ids: np.ndarray) -> int:
    """Add keys ``(n, D)`` under region ids ``(n,) int64`` (normalised here, in chunks).

    Rows whose key is exactly zero (empty regions pooled with ``empty_region="zero"``) are left
    out: they have no direction to retrieve by. Returns the number of keys added.

    Raises:
        ValueError: untrained index, shape mismatch, negative or repeated ids, or ids already present.
    """
    ids = np.asarray(ids)
    if keys.ndim != 2 or keys.shape[1] != bank.dim or ids.shape != (keys.shape[0],):
        raise ValueError(f"add_keys needs keys (n, {bank.dim}) and ids (n,), got {keys.shape} and {ids.shape}")
    if not bank.index.is_trained:
        raise ValueError("the index is not trained: call train_index first (see build_index)")
    if bank.refine is not None:
        raise ValueError("the index has re-ranking codes (IndexConfig.refine_m): rebuild it (build_index) to add keys")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.size):
        raise ValueError("region ids must be non-negative and distinct")
    if bank.ntotal and np.isin(ids, bank.id_map()).any():
        raise ValueError(f"{int(np.isin(ids, bank.id_map()).sum())} of these region ids are already in the index")
    with _exact_assignment(bank):
        added = _add_chunks(bank, keys, ids)
    bank.invalidate()
    return added


@contextmanager
def _exact_assignment(bank: BankIndex) -> Iterator[None]:
    """Within the block an HNSW coarse quantizer is swapped for a flat one over the same centroids
    (new keys go to their nearest list exactly, as in a flat build; the graph does not change)."""
    saved = bank.inner.quantizer if bank.coarse == "hnsw" else None
    if saved is not None:
        flat = faiss.IndexFlatIP(bank.dim)
        flat.add(np.array(bank.centroids()))
        bank.inner.quantizer = flat
    try:
        yield
    finally:
        if saved is not None:
            bank.inner.quantizer = saved


def _add_chunks(bank: BankIndex, keys: np.ndarray, ids: np.ndarray) -> int:
    added = 0
    for start in range(0, keys.shape[0], _ADD_CHUNK):
        chunk = np.asarray(keys[start : start + _ADD_CHUNK])
        vecs = normalize_keys(chunk)
        keep = np.any(chunk != 0, axis=1)
        if keep.any():
            bank.index.add_with_ids(np.ascontiguousarray(vecs[keep]), np.ascontiguousarray(ids[start : start + _ADD_CHUNK][keep]))
            added += int(keep.sum())
    return added


def use_hnsw_coarse(bank: BankIndex, m: int = 32, ef_construction: int = 40) -> BankIndex:
    """The same IVF-PQ with an HNSW graph (inner product) over its centroids as coarse quantizer.

    Lists, codes and ids are shared with ``bank`` (which must not be used afterwards: its FAISS
    object now holds the HNSW quantizer). The graph is built on one thread, so the same centroids
    give the same graph (FAISS's multi-threaded HNSW insertion depends on thread timing).

    Raises:
        ValueError: ``bank`` is not an IVF-PQ with a flat coarse quantizer.
    """
    if bank.kind not in IVF_KINDS or bank.coarse != "flat":
        raise ValueError(f"use_hnsw_coarse needs an IVF-PQ with a flat coarse quantizer, got kind {bank.kind!r}, coarse {bank.coarse!r}")
    hnsw = faiss.IndexHNSWFlat(bank.dim, m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = ef_construction
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        hnsw.add(np.array(bank.centroids()))
    finally:
        faiss.omp_set_num_threads(threads)
    inner, old = bank.inner, bank.inner.quantizer
    if inner.own_fields:
        old.this.acquire()  # Python frees the flat quantizer with its last reference
    inner.quantizer = hnsw
    hnsw.this.disown()  # the IVF owns the graph from now on (freed and serialised with the index)
    inner.own_fields = True
    return BankIndex(bank._owner)  # the FAISS object that owns the index (``bank.index`` may be a non-owning proxy)


def build_index(keys: np.ndarray, ids: np.ndarray | None = None, cfg: IndexConfig = IndexConfig()) -> BankIndex:
    """The reference build in one call: train on :func:`training_ids` of ``keys``, add all of them.

    Args:
        keys: ``(N, D)`` float16/float32 (an ``np.memmap`` works: rows are read in chunks).
        ids: ``(N,) int64`` region ids; default 0..N-1 (row = id, as the reference's stores).
        cfg: index structure and training sample.
    """
    n = int(keys.shape[0])
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    bank = new_index(int(keys.shape[1]), n, cfg)
    if bank.kind in IVF_KINDS:
        train_index(bank, np.asarray(keys[training_ids(n, cfg)]))
    add_keys(bank, keys, ids)
    if bank.kind in IVF_KINDS and cfg.refine_m and bank.ntotal:
        bank.refine = build_refine_codes(bank, keys, ids, cfg.refine_m, seed=cfg.train_seed)
    if bank.kind in IVF_KINDS and cfg.coarse == "hnsw":
        refine = bank.refine
        bank = use_hnsw_coarse(bank, cfg.coarse_hnsw_m, cfg.coarse_hnsw_ef_construction)
        bank.refine = refine
    return bank


def plan_extension(bank: BankIndex, n_trained: int, n_total: int, cfg: IndexConfig = IndexConfig()) -> str:
    """What a grown bank does with its index: "add" the new keys or "rebuild" from all keys.

    "rebuild" when ``cfg.extension == "retrain"`` and ``n_total > (1 + retrain_growth) * n_trained``,
    or when the index was built with another kind than the bank now needs (a tiny bank built
    "flat" becomes an IVF-PQ once it reaches ``min_ivfpq_regions``), or when the index has re-ranking
    codes (``cfg.refine_m``: they are built over all keys; not in the reference).
    """
    if bank.kind != built_kind(n_total, cfg) or (cfg.refine_m and bank.kind in IVF_KINDS):
        return "rebuild"
    if cfg.extension == "retrain" and n_total > (1.0 + cfg.retrain_growth) * n_trained:
        return "rebuild"
    return "add"


def index_to_bytes(bank: BankIndex) -> bytes:
    """The index in FAISS's serialisation format (what ``faiss.write_index`` writes)."""
    return faiss.serialize_index(bank.index).tobytes()


class _Reader:
    """FAISS read callback over a file object; optionally reads an ``IndexIDMap2`` as an ``IndexIDMap``.

    Both are written as a four-byte tag, the index header, the inner index and the id list; only
    the tag differs, and reading "IxM2" then builds the id -> position hash map that ``reconstruct``
    and ``remove_ids`` use and search never does (~100 MB of heap at 2.9M regions).
    """

    def __init__(self, f: BinaryIO, reverse_map: bool) -> None:
        self.f, self.first = f, not reverse_map

    def __call__(self, n: int) -> bytes:
        data = self.f.read(n)
        if self.first:
            self.first = False
            if data[:4] == _IDMAP2_TAG:
                data = _IDMAP_TAG + data[4:]
        return data


def index_from_file(f: BinaryIO, reverse_map: bool = True) -> BankIndex:
    """Read a FAISS index (a ``.faiss`` file, or :func:`index_to_bytes` output) from a binary file.

    Args:
        f: open binary file positioned at the index.
        reverse_map: False reads an ``IndexIDMap2`` as an ``IndexIDMap`` (same search, no id ->
            position map; for serving). Serialising such an index writes an ``IndexIDMap``,
            which this function reads too.
    """
    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(_Reader(f, reverse_map)))
    except RuntimeError as e:
        raise ValueError(f"not a readable FAISS index: {e}") from e
    return BankIndex(index)


def index_from_bytes(data: bytes, reverse_map: bool = True) -> BankIndex:
    """Inverse of :func:`index_to_bytes` (also reads the bytes of a ``.faiss`` file); see :func:`index_from_file`."""
    return index_from_file(io.BytesIO(data), reverse_map)
