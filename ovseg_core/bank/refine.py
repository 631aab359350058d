"""In-RAM re-ranking codes (``SearchConfig.rerank_with = "codes"``; not in the reference).

A second, finer product-quantizer code per indexed key, kept in RAM beside the index: the
key's **residual** to its IVF list's centroid, ``r = unit(key) - c_list``, encoded with ``m``
sub-quantizers of 8 bits (``m`` bytes per key: 128 bytes = 371 MB at 2.9M regions). A candidate
returned by the index is re-scored by

    <q, c_list> + <q, r_hat> = <q, c_list> + sum_j <q_j, codebook_j[code_j]>

(the first term in float32 from the centroid, the second from a per-query ``(m, 256)`` table),
and the best ``k`` candidates are kept: FAISS's ``IndexRefine`` idea, with residual codes, so
that re-ranking needs no read of the stored fp16 keys (``SearchConfig.rerank_with = "keys"``,
positioned reads of 2 KB per candidate). Codes are stored by index **position** (FAISS's internal
id, the order keys were added), with each position's list number.

Pure: arrays in, arrays out (FAISS trains and encodes the product quantizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovseg_core.bank.faiss_import import faiss
from ovseg_core.bank.index_object import BankIndex, normalize_keys

__all__ = ["RefineCodes", "build_refine_codes", "list_of_positions", "refine_scores", "rerank_positions"]

_KSUB = 256  # 8-bit codes
_CHUNK = 65536  # keys encoded per call (bounds the float32 copy)


@dataclass(frozen=True)
class RefineCodes:
    """Residual PQ codes of an index's keys, by index position.

    ``codebook (m, 256, D / m) float32``; ``codes (ntotal, m) uint8``; ``lists (ntotal,) int32``.
    """

    codebook: np.ndarray
    codes: np.ndarray
    lists: np.ndarray

    @property
    def m(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.codebook.nbytes + self.codes.nbytes + self.lists.nbytes)

    def arrays(self) -> dict[str, np.ndarray]:
        """The three arrays by name (what a store writes)."""
        return {"refine_codebook": self.codebook, "refine_codes": self.codes, "refine_lists": self.lists}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> RefineCodes:
        return cls(np.asarray(arrays["refine_codebook"], np.float32), np.asarray(arrays["refine_codes"], np.uint8),
                   np.asarray(arrays["refine_lists"], np.int32))


def list_of_positions(ivf: faiss.IndexIVF) -> np.ndarray:
    """``(ntotal,) int32``: the inverted list holding each position of a FAISS IVF index whose stored ids are its
    positions (``BankIndex.inner``, or any IVF index built with ids ``0..ntotal-1``)."""
    out = np.full(ivf.ntotal, -1, dtype=np.int32)
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            out[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size)] = lst
    if (out < 0).any():
        raise ValueError(f"{int((out < 0).sum())} index positions are in no inverted list")
    return out


def build_refine_codes(bank: BankIndex, keys: np.ndarray, ids: np.ndarray, m: int, train_size: int = 65536,
                       seed: int = 1234) -> RefineCodes:
    """Residual codes of every key of an IVF ``bank`` (``keys (n, D)`` stored under region ``ids (n,)``).

    The product quantizer is trained by FAISS on the residuals of ``min(train_size, ntotal)`` positions
    drawn uniformly (seed ``seed``; fewer than 256 keys are repeated, so a small bank's keys get nearly their own
    codewords). Keys absent from the index (zero keys) are never read.

    Raises:
        ValueError: not an IVF index, ``m`` does not divide D, an indexed id missing from ``ids``.
    """
    if bank.nlist is None:
        raise ValueError(f"re-ranking codes need an IVF index (their residuals are to list centroids), got kind {bank.kind!r}")
    d = bank.dim
    if m < 1 or d % m:
        raise ValueError(f"refine m={m} must divide the key dimension {d}")
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    pos_ids = bank.id_map()
    at = np.searchsorted(ids[order], pos_ids)
    if pos_ids.size and (at.max() >= ids.size or (ids[order][np.minimum(at, ids.size - 1)] != pos_ids).any()):
        raise ValueError("an indexed region id has no row in the keys given")
    row_of_pos = order[np.minimum(at, max(ids.size - 1, 0))]
    lists = list_of_positions(bank.inner)
    centroids = bank.centroids()

    def residuals(pos: np.ndarray) -> np.ndarray:
        x = normalize_keys(np.asarray(keys[row_of_pos[pos]]))
        return np.ascontiguousarray(x - centroids[lists[pos]])

    rng = np.random.default_rng(seed)
    n = bank.ntotal
    sample = np.sort(rng.choice(n, size=min(train_size, n), replace=False))
    pq = faiss.ProductQuantizer(d, m, 8)
    pq.cp.seed = seed
    train = residuals(sample)
    if train.shape[0] < _KSUB:  # a small bank: FAISS's k-means needs >= 256 points (repeats make duplicate codewords)
        train = np.tile(train, (-(-_KSUB // train.shape[0]), 1))
    pq.train(train)
    codes = np.empty((n, m), dtype=np.uint8)
    for p0 in range(0, n, _CHUNK):
        pos = np.arange(p0, min(p0 + _CHUNK, n))
        codes[p0 : p0 + pos.size] = pq.compute_codes(residuals(pos))
    codebook = faiss.vector_to_array(pq.centroids).reshape(m, _KSUB, d // m).astype(np.float32)
    return RefineCodes(codebook, codes, lists)


def refine_scores(refine: RefineCodes, centroids: np.ndarray, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``(R, C) float32`` approximate inner products ``<q, c_list + r_hat>`` of each query with its candidates.

    ``positions (R, C) int64``: index positions, -1 = none (score -inf).
    """
    r, c = positions.shape
    m, ksub, dsub = refine.codebook.shape
    # per-query tables: (m, R, dsub) @ (m, dsub, 256) -> (R, m, 256)
    lut = np.matmul(queries.reshape(r, m, dsub).transpose(1, 0, 2), refine.codebook.transpose(0, 2, 1))
    lut = np.ascontiguousarray(lut.transpose(1, 0, 2)).reshape(r, m * ksub)
    valid = positions >= 0
    pos = np.where(valid, positions, 0)
    codes = refine.codes[pos.reshape(-1)].reshape(r, c, m).astype(np.intp)
    codes += np.arange(m, dtype=np.intp) * ksub
    residual = np.take_along_axis(lut, codes.reshape(r, c * m), axis=1).reshape(r, c, m).sum(axis=2, dtype=np.float32)
    # coarse term: one float32 inner product per distinct (query, list) pair
    lists = refine.lists[pos].astype(np.int64)
    pair = np.arange(r, dtype=np.int64)[:, None] * centroids.shape[0] + lists
    uniq, inverse = np.unique(pair, return_inverse=True)
    coarse = np.einsum("nd,nd->n", centroids[uniq % centroids.shape[0]], queries[uniq // centroids.shape[0]])
    scores = coarse[inverse.reshape(r, c)] + residual
    return np.where(valid, scores, np.float32(-np.inf)).astype(np.float32)


def rerank_positions(refine: RefineCodes, centroids: np.ndarray, queries: np.ndarray, positions: np.ndarray,
                     k: int) -> np.ndarray:
    """The ``k`` candidates ``positions (R, C)`` with the highest :func:`refine_scores`, best first (ties keep the
    index's order); ``(R, k) int64``, -1 where fewer than k candidates exist."""
    scores = refine_scores(refine, centroids, queries, positions)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(positions, order, axis=1)
    out[np.take_along_axis(scores, order, axis=1) == -np.inf] = -1
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((out.shape[0], k - out.shape[1]), -1, dtype=np.int64)], axis=1)
    return out
