"""Memory-bank hyperparameters (CorrCLIPv2's VISR + DMCE): pooling, index, search, fusion.

Every field defaults to what the authors' code computes (``CorrCLIPv2/memory_bank_builder/`` and
``CorrCLIPv2/corrclip_segmentor.py`` at commit 103bc18; facts in ``docs/banks.md``). Every
deviation is a named field whose default is the reference behaviour; ``__post_init__`` raises
``ValueError`` naming the field and its allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ovseg_core.options import later_option

__all__ = [
    "COARSE_DTYPES",
    "COARSE_KINDS",
    "EMPTY_REGION_MODES",
    "EXTENSION_MODES",
    "INDEX_KINDS",
    "INDEX_METRICS",
    "RERANK_SOURCES",
    "IVF_KINDS",
    "SEARCH_MODES",
    "IndexConfig",
    "FusionConfig",
    "PoolingConfig",
    "SearchConfig",
]

# What a region with no pixel (an all-False slice of a (n, H, W) bool mask stack) pools to:
# "nan" = the reference (the mean over an empty set: a NaN row in the value and key stores);
# "zero" = a zero row (its key is never added to the index, see IndexConfig; a zero value row
# would not change the direction of a support mean anyway).
EMPTY_REGION_MODES: tuple[str, ...] = ("nan", "zero")
# Index structures: "ivfpq" = the authors' IndexIDMap2(IndexIVFPQ(IndexFlatIP)); "flat" = exact
# inner-product search (IndexIDMap2(IndexFlatIP)); "hnsw" = IndexIDMap2(IndexHNSWFlat, inner product);
# "ivfpq_fastscan" = the same IVF structure with FAISS's IndexIVFPQFastScan (4-bit codes, pq_nbits
# must be 4, scanned with SIMD register look-ups; not in the reference: pair it with SearchConfig.rerank).
INDEX_KINDS: tuple[str, ...] = ("ivfpq", "flat", "hnsw", "ivfpq_fastscan")
# Index kinds with inverted lists and a coarse quantizer (nprobe, IndexConfig.coarse apply).
IVF_KINDS: tuple[str, ...] = ("ivfpq", "ivfpq_fastscan")
# Arithmetic of the coarse step of a flat coarse quantizer (R x nlist inner products): "float32" =
# the reference (one BLAS product); "bfloat16" = queries and a bfloat16 copy of the centroids
# multiplied by torch (AMX / AVX512-BF16 kernels where the CPU has them), optionally the best
# ``coarse_refine * nprobe`` lists re-scored in float32 (not in the reference).
COARSE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# What SearchConfig.rerank re-scores candidates with: "keys" = exact cosine with the stored fp16 keys
# (read through a RowReader); "codes" = the index's in-RAM residual PQ codes (ovseg_core.bank.refine;
# approximate, no key reads; not in the reference).
RERANK_SOURCES: tuple[str, ...] = ("keys", "codes")
# Metric of the IVF-PQ: "reference" = the authors' construction without a metric argument, i.e. an
# L2 IVF-PQ over an inner-product coarse quantizer (lists probed by inner product, codes ranked by
# squared L2 on the residuals, plain k-means centroids); "inner_product" = both inner product
# (spherical k-means, IP code ranking).
INDEX_METRICS: tuple[str, ...] = ("reference", "inner_product")
# How a "reference" IVF-PQ is searched on a CPU: "precomputed" = the same lists and the same
# squared-L2 code distances as FAISS's own search (equal up to float rounding), computed from a
# per-list table of ||r||^2 + 2<c, r> built once (nlist * m * 2**nbits float32 in RAM) instead of
# one 1024-d residual table per probed list (FAISS turns its own precomputed tables off for an
# inner-product quantizer); "faiss" = FAISS's own search (slow on CPUs, no table).
SEARCH_MODES: tuple[str, ...] = ("precomputed", "faiss")
# Coarse quantizer of an IVF-PQ (which lists a query probes): "flat" = the reference's exact
# inner-product scan of every centroid (nlist x D multiply-adds per query); "hnsw" = an HNSW graph
# (IndexHNSWFlat, inner product) over the same centroids, built after training and adding, so the
# lists and codes are the flat build's; its search finds the top nprobe centroids approximately.
COARSE_KINDS: tuple[str, ...] = ("flat", "hnsw")
# How an index follows a growing bank: "add" = the reference (new keys are encoded with the
# centroids and codebooks of the first build); "retrain" = rebuild from all stored keys (nlist
# recomputed from the new N) once the bank has grown by more than ``retrain_growth``.
EXTENSION_MODES: tuple[str, ...] = ("add", "retrain")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class PoolingConfig:
    """Region pooling of the bank's values (CLIP) and keys (VFM)."""

    # Pixels per band when a feature map is upsampled to the region map's size: the full-size map
    # is never materialised (only ``band_rows`` x W x C floats at a time). Results do not depend
    # on it. Not in the reference (it upsamples the whole map at once).
    band_rows: int = 64
    # A region with no pixel: "nan" (reference) or "zero", see EMPTY_REGION_MODES.
    empty_region: str = "nan"

    def __post_init__(self) -> None:
        if self.band_rows < 1:
            raise ValueError(f"PoolingConfig.band_rows must be >= 1, got {self.band_rows}")
        _check_choice("PoolingConfig.empty_region", self.empty_region, EMPTY_REGION_MODES)


@dataclass(frozen=True)
class IndexConfig:
    """The retrieval index over the bank's keys and how it is searched and extended."""

    # Index structure, see INDEX_KINDS. Reference: "ivfpq".
    kind: str = "ivfpq"
    # nlist = max(1, int(nlist_factor * sqrt(N))), N = regions at training time. Reference: 8.
    nlist_factor: float = 8.0
    # Product-quantizer sub-vectors (must divide the key dimension). Reference: 32.
    pq_m: int = 32
    # Bits per sub-vector code. Reference: 8.
    pq_nbits: int = 8
    # IVF-PQ metric, see INDEX_METRICS. Reference: "reference" (L2 codes, IP coarse quantizer).
    metric: str = "reference"
    # HNSW graph degree (kind "hnsw").
    hnsw_m: int = 32
    # HNSW construction beam (kind "hnsw"). FAISS default: 40.
    hnsw_ef_construction: int = 40
    # Training sample: at most this many keys (uniformly sampled, seed ``train_seed``) train the
    # IVF-PQ; None = all N, the reference (FAISS's k-means itself keeps at most 256 per centroid).
    train_size: int | None = None
    # Seed of the training sample and of FAISS's k-means. FAISS default: 1234.
    train_seed: int = 1234
    # Growth policy, see EXTENSION_MODES. Reference: "add" (never retrain).
    extension: str = "add"
    # With extension "retrain": rebuild once N > (1 + retrain_growth) * N at the last training.
    retrain_growth: float = 0.0
    # Coarse quantizer of an IVF-PQ, see COARSE_KINDS. Reference: "flat".
    coarse: str = later_option("flat")
    # HNSW graph degree of the coarse quantizer (coarse "hnsw").
    coarse_hnsw_m: int = later_option(32)
    # HNSW construction beam of the coarse quantizer (coarse "hnsw"). FAISS default: 40.
    coarse_hnsw_ef_construction: int = later_option(40)
    # In-RAM re-ranking codes (ovseg_core.bank.refine): bytes (8-bit sub-quantizers) of a residual PQ code
    # per key, built with the index for SearchConfig.rerank_with="codes"; 0 = none (the reference).
    refine_m: int = later_option(0)

    def __post_init__(self) -> None:
        _check_choice("IndexConfig.kind", self.kind, INDEX_KINDS)
        _check_choice("IndexConfig.metric", self.metric, INDEX_METRICS)
        _check_choice("IndexConfig.extension", self.extension, EXTENSION_MODES)
        if not self.nlist_factor > 0:
            raise ValueError(f"IndexConfig.nlist_factor must be > 0, got {self.nlist_factor}")
        if self.pq_m < 1:
            raise ValueError(f"IndexConfig.pq_m must be >= 1, got {self.pq_m}")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"IndexConfig.pq_nbits must be in 1..16, got {self.pq_nbits}")
        if self.hnsw_m < 2 or self.hnsw_ef_construction < 1:
            raise ValueError(
                "IndexConfig.hnsw_m must be >= 2 and hnsw_ef_construction >= 1, got "
                f"{self.hnsw_m}, {self.hnsw_ef_construction}"
            )
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"IndexConfig.train_size must be None (all keys) or >= 1, got {self.train_size}")
        if self.retrain_growth < 0:
            raise ValueError(f"IndexConfig.retrain_growth must be >= 0, got {self.retrain_growth}")
        _check_choice("IndexConfig.coarse", self.coarse, COARSE_KINDS)
        if self.coarse != "flat" and self.kind not in IVF_KINDS:
            raise ValueError(f"IndexConfig.coarse={self.coarse!r} needs kind 'ivfpq' or 'ivfpq_fastscan' (an IVF index), got kind {self.kind!r}")
        if self.kind == "ivfpq_fastscan" and self.pq_nbits != 4:
            raise ValueError(f"IndexConfig.kind='ivfpq_fastscan' needs pq_nbits=4 (FastScan codes are 4-bit), got {self.pq_nbits}")
        if self.refine_m < 0:
            raise ValueError(f"IndexConfig.refine_m must be >= 0 (0 = no re-ranking codes), got {self.refine_m}")
        if self.refine_m and self.kind not in IVF_KINDS:
            raise ValueError(f"IndexConfig.refine_m needs an IVF index kind {IVF_KINDS}, got kind {self.kind!r}")
        if self.coarse_hnsw_m < 2:
            raise ValueError(f"IndexConfig.coarse_hnsw_m must be >= 2, got {self.coarse_hnsw_m}")
        if self.coarse_hnsw_ef_construction < 1:
            raise ValueError(f"IndexConfig.coarse_hnsw_ef_construction must be >= 1, got {self.coarse_hnsw_ef_construction}")

    @property
    def min_ivfpq_regions(self) -> int:
        """The tiny-bank rule: below this many keys an IVF index ("ivfpq", "ivfpq_fastscan") is built as "flat".

        FAISS cannot train a product quantizer on fewer vectors than it has codes per sub-vector
        (2**pq_nbits: the reference's training raises there); exact search over so few keys is
        cheap and exact, so ovseg builds a flat index instead (recorded by the index's kind).
        """
        return 2**self.pq_nbits


@dataclass(frozen=True)
class SearchConfig:
    """Which bank regions a test image's regions retrieve (decides the retrieved ids)."""

    # Neighbours per region (the reference's num_support). Reference: 20.
    k: int = 20
    # nprobe = min(nprobe_max, nlist) for an IVF index. Reference: 256.
    nprobe_max: int = 256
    # CPU search path of a "reference" IVF-PQ, see SEARCH_MODES. Both return the same neighbours
    # up to float rounding of the distances, so a stage key need not hash it.
    search: str = "precomputed"
    # Exact re-ranking: fetch ``rerank_candidates`` neighbours from the index, re-score them by
    # cosine with the stored fp16 keys and keep the best k. Not in the reference.
    rerank: bool = False
    # Candidates fetched from the index when ``rerank`` (raised to k when smaller).
    rerank_candidates: int = 100
    # HNSW search beam (index kind "hnsw"; raised to the number of neighbours asked when smaller).
    hnsw_ef_search: int = 128
    # Search beam of an HNSW coarse quantizer (IndexConfig.coarse "hnsw"): efSearch =
    # max(coarse_ef_search, nprobe); None = nprobe. Unused by a flat coarse quantizer.
    coarse_ef_search: int | None = later_option(None)
    # Arithmetic of the flat coarse step, see COARSE_DTYPES. Reference: "float32".
    coarse_dtype: str = later_option("float32")
    # With coarse_dtype "bfloat16": the best coarse_refine * nprobe lists by the bfloat16 product are
    # re-scored in float32 and the best nprobe of those probed (with their float32 inner products;
    # 2 probed the float32 step's lists for every stand-in query measured, docs/banks.md);
    # 0 = probe the bfloat16 top nprobe with their bfloat16 inner products (the fast choice).
    coarse_refine: int = later_option(0)
    # What ``rerank`` re-scores with, see RERANK_SOURCES. "codes" needs an IVF index with re-ranking
    # codes attached (IndexConfig.refine_m > 0).
    rerank_with: str = later_option("keys")
    # FAISS FastScan implementation of an "ivfpq_fastscan" search (IndexIVFFastScan.implem): 0 = FAISS's
    # choice (12 or 13 for blocks of 32: queries grouped by inverted list); 10 / 11 = one query at a
    # time (heap / reservoir). The neighbours do not depend on it up to ties.
    fastscan_implem: int = later_option(0)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"SearchConfig.k must be >= 1, got {self.k}")
        if self.nprobe_max < 1:
            raise ValueError(f"SearchConfig.nprobe_max must be >= 1, got {self.nprobe_max}")
        _check_choice("SearchConfig.search", self.search, SEARCH_MODES)
        if self.rerank_candidates < 1:
            raise ValueError(f"SearchConfig.rerank_candidates must be >= 1, got {self.rerank_candidates}")
        if self.hnsw_ef_search < 1:
            raise ValueError(f"SearchConfig.hnsw_ef_search must be >= 1, got {self.hnsw_ef_search}")
        if self.coarse_ef_search is not None and self.coarse_ef_search < 1:
            raise ValueError(f"SearchConfig.coarse_ef_search must be None (= nprobe) or >= 1, got {self.coarse_ef_search}")
        _check_choice("SearchConfig.coarse_dtype", self.coarse_dtype, COARSE_DTYPES)
        _check_choice("SearchConfig.rerank_with", self.rerank_with, RERANK_SOURCES)
        if self.fastscan_implem not in (0, 1, 2, 10, 11, 12, 13, 14, 15):
            raise ValueError(f"SearchConfig.fastscan_implem must be 0 (FAISS's choice) or a FAISS implem 1, 2, 10-15, got {self.fastscan_implem}")
        if self.coarse_refine < 0:
            raise ValueError(f"SearchConfig.coarse_refine must be >= 0 (0 = no float32 re-scoring), got {self.coarse_refine}")


@dataclass(frozen=True)
class FusionConfig:
    """How the retrieved values enter the prediction (VISR support + DMCE)."""

    # P = alpha * P_own + (1 - alpha) * S on the window-averaged cosine logits. Reference: 0.5
    # (hard-coded ``self.alpha`` in the reference).
    alpha: float = 0.5
    # DMCE: S = (1 - aux_weight) * S_main + aux_weight * S_aux when an auxiliary store is given.
    # Reference: 0.5 (the mean of the two).
    aux_weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"FusionConfig.alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.aux_weight <= 1.0:
            raise ValueError(f"FusionConfig.aux_weight must be in [0, 1], got {self.aux_weight}")
