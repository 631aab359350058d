"""The FAISS object behind a bank index, as search reads it (:class:`BankIndex`), and the key normalisation.

Split from :mod:`ovseg_core.bank.index` (build, extension, serialisation), which re-exports both names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ovseg_core.bank.config import IVF_KINDS
from ovseg_core.bank.faiss_import import faiss

__all__ = ["KEY_EPS", "BankIndex", "normalize_keys"]
# The reference's normalisation: v / (||v|| + 1e-12) (not F.normalize's max(||v||, eps)).
KEY_EPS = 1e-12


class BankIndex:
    """A FAISS ``IndexIDMap2`` (or ``IndexIDMap``) and what searching it needs (``ovseg_core.bank.search``).

    ``kind`` is "ivfpq", "ivfpq_fastscan", "flat" or "hnsw"; ``metric`` ("reference" or "inner_product") and
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
        if isinstance(self.inner, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
            self.kind = "ivfpq" if isinstance(self.inner, faiss.IndexIVFPQ) else "ivfpq_fastscan"
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
            raise ValueError(
                f"unsupported inner index {type(self.inner).__name__}; expected IndexIVFPQ, IndexIVFPQFastScan, IndexFlat or IndexHNSW"
            )
        self.coarse: str | None = None
        if self.kind in IVF_KINDS:
            quantizer = faiss.downcast_index(self.inner.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                self.coarse = "hnsw"
            elif isinstance(quantizer, faiss.IndexFlat):
                self.coarse = "flat"
            else:
                raise ValueError(f"unsupported coarse quantizer {type(quantizer).__name__}; expected IndexFlat or IndexHNSW")
        self._id_map: np.ndarray | None = None
        self._centroid_norms: np.ndarray | None = None
        self._centroids_bf16: torch.Tensor | None = None
        # In-RAM re-ranking codes (``ovseg_core.bank.refine.RefineCodes``; ``SearchConfig.rerank_with="codes"``),
        # attached by the caller: they are not part of the FAISS serialisation.
        self.refine: Any = None

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nlist(self) -> int | None:
        """Inverted lists of an IVF index, else None."""
        return int(self.inner.nlist) if self.kind in IVF_KINDS else None

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

    def centroids_bf16(self) -> torch.Tensor:
        """``(nlist, D) bfloat16`` copy of the IVF centroids (cached; the ``coarse_dtype="bfloat16"`` search)."""
        if self._centroids_bf16 is None:
            self._centroids_bf16 = torch.from_numpy(np.array(self.centroids())).to(torch.bfloat16)
        return self._centroids_bf16

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
    return vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + KEY_EPS)
