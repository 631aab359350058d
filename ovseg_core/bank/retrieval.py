"""Retrieval and fusion at inference: VISR support logits, DMCE, and the fused prediction.

The reference (``CorrCLIPv2/corrclip_segmentor.py`` ``forward_slide``, ``get_support_clip_logits``):

1. one query per distinct id of the network-input region map, the unsegmented id included
   (:func:`ovseg_core.bank.pooling.region_queries`);
2. K = 20 nearest bank keys (:func:`ovseg_core.bank.search.search_index`), ids -1 dropped;
3. support feature = unweighted mean of the K retrieved values, L2-normalised;
4. support logits = cosine with the **same** CLIP's text embeddings, one row per region,
   broadcast to the region's pixels;
5. DMCE: the auxiliary store (DFN2B-CLIP ViT-B/16) is read through the same ids and scored
   against the auxiliary CLIP's own text embeddings; S = 0.5 S_main + 0.5 S_aux;
6. P = alpha P_own + (1 - alpha) S, alpha = 0.5, on the window-averaged cosine logits at the
   network-input size, before the resize to the original size, x logit_scale and softmax.

A region whose K ids are all -1 has no support: the reference divides by zero (a NaN support
row and NaN logits on its pixels); here its pixels keep their own logits (P = P_own there).

Values are read through a :class:`~ovseg_core.bank.rows.RowReader` (only the retrieved rows);
precision: float32 throughout (the reference: fp16 values, fp16 means and fp16 logits on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ovseg_core.bank.config import FusionConfig, SearchConfig
from ovseg_core.bank.index import BankIndex
from ovseg_core.bank.pooling import region_queries
from ovseg_core.bank.rows import RowReader
from ovseg_core.bank.search import search_index

__all__ = [
    "BankSupport",
    "ValueStore",
    "fuse",
    "fuse_support",
    "retrieve_and_fuse",
    "search_images",
    "support_features",
    "support_logits",
]

_NORM_EPS = 1e-12
# Rows per band in fuse (a (Q, rows, W) gather at a time).
_FUSE_BAND_ROWS = 16


@dataclass(frozen=True)
class ValueStore:
    """One CLIP's value store and that CLIP's text embeddings."""

    rows: RowReader  # (N, D) values (fp16 in the bank), row = region id
    text: torch.Tensor  # (Q, D) float32 L2-normalised text embeddings of the same CLIP

    def __post_init__(self) -> None:
        if not isinstance(self.text, torch.Tensor) or self.text.ndim != 2 or self.text.shape[1] != self.rows.dim:
            got = tuple(self.text.shape) if isinstance(self.text, torch.Tensor) else type(self.text).__name__
            raise ValueError(f"ValueStore.text must be a (Q, {self.rows.dim}) tensor matching the store's dim, got {got}")


@dataclass(frozen=True)
class BankSupport:
    """What the bank contributed to one image (for the fusion and the run's record)."""

    region_ids: np.ndarray  # (R,) int64: the region map's ids, ascending (the unsegmented one included)
    labels: np.ndarray  # (H, W) int64: index into region_ids of each pixel
    neighbours: np.ndarray  # (R, K) int64: retrieved bank region ids, nearest first, -1 = none
    logits: torch.Tensor  # (R, Q) float32: support logits per region (after DMCE)
    found: np.ndarray  # (R,) bool: False where all K neighbours are missing (own logits kept)


def support_features(neighbours: np.ndarray, rows: RowReader) -> tuple[torch.Tensor, np.ndarray]:
    """Unweighted mean of each region's retrieved values, L2-normalised.

    Args:
        neighbours: ``(R, K) int64`` bank ids, -1 = missing (dropped from the mean).
        rows: the value store; only the retrieved rows are read.
    Returns:
        ``(R, D) float32`` unit support features (zero rows where nothing was found) and
        ``found (R,) bool``.
    """
    if neighbours.ndim != 2:
        raise ValueError(f"neighbours must be (R, K), got shape {neighbours.shape}")
    valid = neighbours >= 0
    gathered = np.zeros((*neighbours.shape, rows.dim), dtype=np.float32)
    if valid.any():
        gathered[valid] = rows.rows(neighbours[valid])
    counts = valid.sum(axis=1)
    found = counts > 0
    means = (gathered.sum(axis=1) / np.maximum(counts, 1)[:, None]).astype(np.float32)
    feats = torch.from_numpy(means)
    return torch.nn.functional.normalize(feats, dim=1, eps=_NORM_EPS), found


def support_logits(
    neighbours: np.ndarray, stores: Sequence[ValueStore], cfg: FusionConfig = FusionConfig()
) -> tuple[torch.Tensor, np.ndarray]:
    """Support logits per region: cosine of the support feature with each store's own text embeddings.

    Args:
        neighbours: ``(R, K) int64`` retrieved ids (-1 = missing).
        stores: the main store, optionally followed by the DMCE auxiliary store (same ids).
        cfg: DMCE weight.
    Returns:
        ``(R, Q) float32`` = S_main, or (1 - aux_weight) S_main + aux_weight S_aux; and ``found``.
    Raises:
        ValueError: not one or two stores, or stores with different numbers of queries.
    """
    if len(stores) not in (1, 2):
        raise ValueError(f"support_logits takes the main store and optionally one auxiliary store, got {len(stores)}")
    if len({int(s.text.shape[0]) for s in stores}) != 1:
        raise ValueError(f"every store must score the same queries, got {[int(s.text.shape[0]) for s in stores]} text rows")
    feats, found = support_features(neighbours, stores[0].rows)
    logits = feats @ stores[0].text.to(torch.float32).T
    if len(stores) == 2:
        aux_feats, _ = support_features(neighbours, stores[1].rows)
        aux = aux_feats @ stores[1].text.to(torch.float32).T
        logits = (1.0 - cfg.aux_weight) * logits + cfg.aux_weight * aux
    return logits, found


def fuse(
    own: torch.Tensor,
    region_logits: torch.Tensor,
    labels: np.ndarray,
    found: np.ndarray,
    cfg: FusionConfig = FusionConfig(),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """P = alpha P_own + (1 - alpha) S, S broadcast from regions to pixels; own logits where not found.

    Args:
        own: ``(Q, H, W) float`` window-averaged cosine logits at the network-input size.
        region_logits: ``(R, Q)`` support logits per region.
        labels: ``(H, W) int64`` region index (0..R-1) of each pixel.
        found: ``(R,) bool``; regions without support keep P = P_own on their pixels.
        cfg: alpha.
        out: ``(Q, H, W)`` tensor to write into; ``own`` itself fuses in place (as the reference
            does); None: a new tensor.
    Returns:
        ``(Q, H, W)`` fused logits, ``own``'s dtype (``out`` when given).
    """
    q, h, w = own.shape
    if tuple(labels.shape) != (h, w) or region_logits.shape[1] != q or found.shape != (region_logits.shape[0],):
        raise ValueError(
            f"fuse needs own (Q, H, W), region_logits (R, Q), labels (H, W), found (R,), got {tuple(own.shape)}, "
            f"{tuple(region_logits.shape)}, {tuple(labels.shape)}, {tuple(found.shape)}"
        )
    out = torch.empty_like(own) if out is None else out
    found_t = torch.from_numpy(np.asarray(found, dtype=bool))
    own_weight = torch.where(found_t, cfg.alpha, 1.0).to(own.dtype)
    support = (region_logits.to(own.dtype) * torch.where(found_t, 1.0 - cfg.alpha, 0.0).to(own.dtype)[:, None]).T.contiguous()
    index = torch.from_numpy(np.ascontiguousarray(labels))
    for y0 in range(0, h, _FUSE_BAND_ROWS):  # bands keep the gathered support small and in cache
        lab = index[y0 : y0 + _FUSE_BAND_ROWS].reshape(-1)
        rows = lab.shape[0] // w
        band = out[:, y0 : y0 + rows]
        torch.mul(own[:, y0 : y0 + rows], own_weight.index_select(0, lab).view(rows, w), out=band)
        band.add_(support.index_select(1, lab).view(q, rows, w))
    return out


def search_images(
    queries: Sequence[np.ndarray], bank: BankIndex, search: SearchConfig = SearchConfig(), key_rows: RowReader | None = None
) -> list[np.ndarray]:
    """Step 2 for several images in one search call: ``(R_i, K) int64`` neighbours per image.

    ``queries``: each image's ``(R_i, D) float32`` region queries. One call reads the coarse
    quantizer's centroids once for every region of the batch; each query's neighbours are those of
    a search of its image alone (queries are searched independently).
    """
    if not queries:
        return []
    found = search_index(bank, np.concatenate(queries), search, key_rows)
    return np.split(found, np.cumsum([q.shape[0] for q in queries])[:-1])


def fuse_support(
    own: torch.Tensor,
    region_ids: np.ndarray,
    labels: np.ndarray,
    neighbours: np.ndarray,
    stores: Sequence[ValueStore],
    fusion: FusionConfig = FusionConfig(),
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BankSupport]:
    """Steps 3-6 for one image whose neighbours were retrieved (:func:`search_images`)."""
    logits, found = support_logits(neighbours, stores, fusion)
    fused = fuse(own, logits, labels, found, fusion, out=out)
    return fused, BankSupport(region_ids, labels, neighbours, logits, found)


def retrieve_and_fuse(
    own: torch.Tensor,
    region_map: np.ndarray | torch.Tensor,
    vfm_map: torch.Tensor,
    bank: BankIndex,
    stores: Sequence[ValueStore],
    search: SearchConfig = SearchConfig(),
    fusion: FusionConfig = FusionConfig(),
    key_rows: RowReader | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BankSupport]:
    """The whole per-image bank step of CorrCLIPv2 (steps 1-6 of the module docstring).

    Args:
        own: ``(Q, H, W)`` window-averaged cosine logits at the network-input size.
        region_map: ``(H, W)`` region ids at the network-input size (nearest-resized mask).
        vfm_map: ``(C, h, w)`` VFM map; resized to (H, W) and normalised per pixel inside (pass
            the already resized, normalised map to skip the resize).
        bank: the key index.
        stores: main value store, optionally the DMCE auxiliary store.
        search: k, nprobe, re-ranking.
        fusion: alpha, DMCE weight.
        key_rows: the key store, for ``search.rerank``.
        out: where the fused logits go (``own`` fuses in place, as the reference); None: a new tensor.
    Returns:
        fused ``(Q, H, W)`` logits and the :class:`BankSupport` record.
    """
    region_ids, labels, queries = region_queries(vfm_map, region_map)
    (neighbours,) = search_images([queries], bank, search, key_rows)
    return fuse_support(own, region_ids, labels, neighbours, stores, fusion, out=out)
