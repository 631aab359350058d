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

from ovseg_core.bank.config import IndexConfig
from ovseg_core.bank.faiss_import import faiss

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

# The reference's normalisation: v / (||v|| + 1e-12) (not F.normalize's max(||v||, eps)).
_KEY_EPS = 1e-12
# FAISS's serialisation tags of IndexIDMap2 and IndexIDMap.
_IDMAP2_TAG, _IDMAP_TAG = b"IxM2", b"IxMp"
# Rows per add_with_ids call when adding (bounds the float32 copy of the keys).
_ADD_CHUNK = 65536


class BankIndex:
    """A FAISS ``IndexIDMap2`` (or ``IndexIDMap``) and what searching it needs (``ovseg_core.bank.search``).

    ``kind`` is "ivfpq", "flat" or "hnsw"; ``metric`` ("reference" or "inner_product") and
    ``coarse`` ("flat" or "hnsw" for an IVF-PQ, else None) are read from the FAISS objects, so an
    imported index describes itself.
    """

    def __init__(self, index: faiss.Index) -> None:
        self._owner = index  # keeps the object FAISS allocated alive behind any downcast proxy
        index = faiss.downcast_index(index)
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
            raise ValueError(f"a bank index must be a FAISS IndexIDMap2 or IndexIDMap (ids = region ids), got {type(index).__name__}")
        self.index = index
        self.inner = faiss.downcast_index(index.index)
        if isinstance(self.inner, faiss.IndexIVFPQ):
            self.kind = "ivfpq"
            quantizer_ip = self.inner.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
            if self.inner.metric_type == faiss.METRIC_INNER_PRODUCT:
                self.metric = "inner_product"
            elif quantizer_ip:
                self.metric = "reference"
            else:
                self.metric = "l2"
        elif isinstance(self.inner, faiss.IndexFlat):
            self.kind, self.metric = "flat", _metric_name(self.inner.metric_type)
        elif isinstance(self.inner, faiss.IndexHNSW):
            self.kind, self.metric = "hnsw", _metric_name(self.inner.metric_type)
        else:
            raise ValueError(f"unsupported inner index {type(self.inner).__name__}; expected IndexIVFPQ, IndexFlat or IndexHNSW")
        self.coarse: str | None = None
        if self.kind == "ivfpq":
            quantizer = faiss.downcast_index(self.inner.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                self.coarse = "hnsw"
            elif isinstance(quantizer, faiss.IndexFlat):
                self.coarse = "flat"
            else:
                raise ValueError(f"unsupported coarse quantizer {type(quantizer).__name__}; expected IndexFlat or IndexHNSW")
        self._id_map: np.ndarray | None = None
        self._centroid_norms: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int | None:
        """Inverted lists of an IVF index, else None."""
        return int(self.inner.nlist) if self.kind == "ivfpq" else None

    def ids(self) -> np.ndarray:
        """``(ntotal,) int64``: the region id of each stored vector, in insertion order (a copy)."""
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def id_map(self) -> np.ndarray:
        """:meth:`ids` as a read-only view of FAISS's own vector (no copy; renewed after :func:`add_keys`)."""
        if self._id_map is None or self._id_map.shape[0] != self.ntotal:
            view = faiss.rev_swig_ptr(self.index.id_map.data(), self.index.id_map.size()) if self.ntotal else np.empty(0, np.int64)
            view.flags.writeable = False
            self._id_map = view
        return self._id_map

    def centroids(self) -> np.ndarray:
        """``(nlist, D) float32`` IVF centroids: a read-only view of the coarse quantizer's own storage (no copy)."""
        quantizer = faiss.downcast_index(self.inner.quantizer)
        flat = faiss.downcast_index(quantizer.storage) if isinstance(quantizer, faiss.IndexHNSW) else quantizer
        n, d = int(flat.ntotal), int(flat.d)
        view = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d) if n else np.empty((0, d), np.float32)
        view.flags.writeable = False
        return view

    def centroid_norms(self) -> np.ndarray:
        """``(nlist,) float32`` squared norms of the IVF centroids (cached)."""
        if self._centroid_norms is None:
            self._centroid_norms = (self.centroids() ** 2).sum(axis=1, dtype=np.float32)
        return self._centroid_norms

    def invalidate(self) -> None:
        """Forget cached search state (after vectors were added)."""
        self._id_map = None


def _metric_name(metric: int) -> str:
    return "inner_product" if metric == faiss.METRIC_INNER_PRODUCT else "l2"


def normalize_keys(keys: np.ndarray) -> np.ndarray:
    """``(n, D) float32`` keys divided by ``(norm + 1e-12)``, as the reference does before indexing.

    Raises:
        ValueError: a key holds NaN or Inf (an empty region pooled with ``empty_region="nan"``;
            FAISS training rejects them and adding them would corrupt the index).
    """
    vecs = np.ascontiguousarray(keys, dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"keys must be (n, D), got shape {vecs.shape}")
    bad = ~np.isfinite(vecs).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} key rows hold NaN/Inf (first rows {np.flatnonzero(bad)[:5].tolist()}): empty regions "
            "pooled with PoolingConfig.empty_region='nan' (the reference); pool with empty_region='zero' or leave "
            "those ids out of the index"
        )
    return vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + _KEY_EPS)


def _nlist(n: int, cfg: IndexConfig) -> int:
    return max(1, int(cfg.nlist_factor * math.sqrt(n)))


def built_kind(n_total: int, cfg: IndexConfig) -> str:
    """The kind actually built for ``n_total`` keys (the tiny-bank rule: "ivfpq" -> "flat")."""
    if cfg.kind == "ivfpq" and n_total < cfg.min_ivfpq_regions:
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
        if cfg.metric == "reference":
            inner = faiss.IndexIVFPQ(quantizer, dim, _nlist(n_total, cfg), cfg.pq_m, cfg.pq_nbits)
        else:
            inner = faiss.IndexIVFPQ(quantizer, dim, _nlist(n_total, cfg), cfg.pq_m, cfg.pq_nbits, faiss.METRIC_INNER_PRODUCT)
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
    """Train an IVF-PQ on ``keys`` ``(n, D)`` (normalised here); a no-op for flat and HNSW.

    Raises:
        ValueError: fewer training keys than the index needs (nlist centroids, 2**nbits PQ codes).
    """
    if bank.kind != "ivfpq":
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
    if bank.kind != "ivfpq" or bank.coarse != "flat":
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
    if bank.kind == "ivfpq":
        train_index(bank, np.asarray(keys[training_ids(n, cfg)]))
    add_keys(bank, keys, ids)
    if bank.kind == "ivfpq" and cfg.coarse == "hnsw":
        bank = use_hnsw_coarse(bank, cfg.coarse_hnsw_m, cfg.coarse_hnsw_ef_construction)
    return bank


def plan_extension(bank: BankIndex, n_trained: int, n_total: int, cfg: IndexConfig = IndexConfig()) -> str:
    """What a grown bank does with its index: "add" the new keys or "rebuild" from all keys.

    "rebuild" when ``cfg.extension == "retrain"`` and ``n_total > (1 + retrain_growth) * n_trained``,
    or when the index was built with another kind than the bank now needs (a tiny bank built
    "flat" becomes an IVF-PQ once it reaches ``min_ivfpq_regions``).
    """
    if bank.kind != built_kind(n_total, cfg):
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
