"""Stand-in memory bank for ``bench/bank.py``: random vectors with cluster structure, on disk.

Keys (``keys.npy``, N x D_key fp16): three-level clusters. Each region belongs to a *fine group*
(5-35 regions, like near-duplicate regions of similar images) inside a *coarse cluster* (one
per IVF list of the reference's nlist = int(8 sqrt N)):

    key = norm * unit(A_COARSE * coarse_c + A_FINE * u_g + A_POINT * u_i)

with random unit directions coarse_c, u_g, u_i and norm ~ U(0.55, 0.95) (keys are means of unit
vectors, norm < 1). Values (``main.npy``, ``aux.npy``): random unit rows, fp16. Everything is
written in batches of whole fine groups through ``np.lib.format.open_memmap`` (never in RAM whole)
and cached: ``meta.json`` is written last and names the spec, so a finished stand-in is reused.

``structured_index`` builds the authors' index *structure* for large N without k-means (which
takes hours on 2 cores at 2.9M): the IVF centroids are the generating coarse centres (scaled as
a mean of member keys would be), the PQ codebooks are trained by FAISS on 65,536 residuals, and
each key goes to its generating coarse list (checked against the nearest centroid on a sample).
Search cost and memory are those of the real nlist, m, nbits; only the trained centroids differ.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from ovseg_core.bank.refine import list_of_positions

A_COARSE, A_FINE, A_POINT = 0.6, 0.55, 0.6
FINE_SIZES = (5, 36)  # fine-group sizes drawn from [5, 36)
QUERY_NOISE = 0.6  # query = unit(unit(bank key) + QUERY_NOISE * random unit direction)
GROUPS_PER_BATCH = 2000  # fine groups generated (and written) at once: ~40k regions
PQ_TRAIN = 65536  # FAISS's own cap for the PQ training of an IVF-PQ (256 per code * 256 codes)


@dataclass(frozen=True)
class Spec:
    regions: int
    dim_key: int = 1024
    dim_main: int = 768
    dim_aux: int = 512
    seed: int = 0

    @property
    def coarse(self) -> int:
        return max(1, int(8 * math.sqrt(self.regions)))

    def folder(self, out: Path) -> Path:
        return out / f"bank-standin-n{self.regions}-k{self.dim_key}-v{self.dim_main}-a{self.dim_aux}-s{self.seed}"


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def coarse_centres(spec: Spec) -> np.ndarray:
    return _unit_rows(np.random.default_rng([spec.seed, 1]), spec.coarse, spec.dim_key)


def _groups(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """(group sizes, coarse cluster of each group); sizes sum to N."""
    rng = np.random.default_rng([spec.seed, 2])
    sizes = rng.integers(*FINE_SIZES, size=spec.regions // FINE_SIZES[0] + 1)
    ends = np.cumsum(sizes)
    last = int(np.searchsorted(ends, spec.regions))
    sizes = sizes[: last + 1].copy()
    sizes[-1] -= int(ends[last] - spec.regions)
    return sizes, rng.integers(0, spec.coarse, size=sizes.shape[0])


def generate(spec: Spec, out: Path, log: Callable[[str], None] = print) -> Path:
    """Write (or reuse) the stand-in under ``spec.folder(out)``; returns the folder."""
    folder = spec.folder(out)
    meta = folder / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("spec") == asdict(spec):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n = spec.regions
    keys = np.lib.format.open_memmap(folder / "keys.npy", "w+", np.float16, (n, spec.dim_key))
    main = np.lib.format.open_memmap(folder / "main.npy", "w+", np.float16, (n, spec.dim_main))
    aux = np.lib.format.open_memmap(folder / "aux.npy", "w+", np.float16, (n, spec.dim_aux))
    coarse_of_row = np.lib.format.open_memmap(folder / "coarse.npy", "w+", np.int32, (n,))
    centres = coarse_centres(spec)
    sizes, coarse_of_group = _groups(spec)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    t0, g0, batch = time.time(), 0, 0
    while g0 < sizes.shape[0]:  # batches of whole fine groups, each with its own seed
        g1 = min(g0 + GROUPS_PER_BATCH, sizes.shape[0])
        r0, r1 = int(starts[g0]), int(starts[g1])
        rng = np.random.default_rng([spec.seed, 3, batch])
        group_of_row = np.repeat(np.arange(g0, g1), sizes[g0:g1])
        fine = _unit_rows(rng, g1 - g0, spec.dim_key)[group_of_row - g0]
        c = coarse_of_group[group_of_row]
        x = A_COARSE * centres[c] + A_FINE * fine + A_POINT * _unit_rows(rng, r1 - r0, spec.dim_key)
        x *= (rng.uniform(0.55, 0.95, size=(r1 - r0, 1)) / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        keys[r0:r1] = x
        coarse_of_row[r0:r1] = c
        main[r0:r1] = _unit_rows(rng, r1 - r0, spec.dim_main)
        aux[r0:r1] = _unit_rows(rng, r1 - r0, spec.dim_aux)
        g0, batch = g1, batch + 1
        if batch % 10 == 0:
            log(f"stand-in: {r1}/{n} regions written ({time.time() - t0:.0f} s)")
    for arr in (keys, main, aux, coarse_of_row):
        arr.flush()
    del keys, main, aux, coarse_of_row
    meta.write_text(json.dumps({"spec": asdict(spec), "seconds": time.time() - t0}))
    return folder


def queries(folder: Path, n: int, seed: int) -> np.ndarray:
    """``(n, D) float32`` unit queries near random bank keys (a test region like a bank region)."""
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    rng = np.random.default_rng([seed, 4])
    rows = np.sort(rng.choice(keys.shape[0], size=n, replace=n > keys.shape[0]))
    base = keys[rows].astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = base + QUERY_NOISE * _unit_rows(rng, n, keys.shape[1])
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return q[rng.permutation(n)].astype(np.float32)


def exact_topk(folder: Path, q: np.ndarray, k: int, chunk: int = 100000) -> np.ndarray:
    """``(n, k) int64`` exact inner-product neighbours of unit queries among the unit keys (chunked)."""
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    best_s = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    best_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for r0 in range(0, keys.shape[0], chunk):
        block = keys[r0 : r0 + chunk].astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True) + 1e-12
        s = q @ block.T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, top + r0], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)
    return best_i


def structured_index(folder: Path, spec: Spec, chunk: int = 100000, log: Callable[[str], None] = print) -> tuple[faiss.Index, dict]:
    """The authors' IndexIDMap2(IndexIVFPQ(IndexFlatIP)) over the stand-in without k-means (see module doc)."""
    d, nlist = spec.dim_key, spec.coarse
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    coarse_of_row = np.load(folder / "coarse.npy", mmap_mode="r")
    spread = math.sqrt(A_COARSE**2 + A_FINE**2 + A_POINT**2)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(coarse_centres(spec) * np.float32(A_COARSE / spread))  # ~ the mean of a cluster's unit keys
    ivf = faiss.IndexIVFPQ(quantizer, d, nlist, 32, 8)  # no metric argument: the reference's quirk
    index = faiss.IndexIDMap2(ivf)
    rng = np.random.default_rng([spec.seed, 5])
    sample = np.sort(rng.choice(spec.regions, size=min(PQ_TRAIN, spec.regions), replace=False))
    train = keys[sample].astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True) + 1e-12
    t0 = time.time()
    ivf.train(train)  # the quantizer is full, so FAISS trains only the PQ (on the residuals)
    _, nearest = quantizer.search(train[:5000], 1)
    agree = float((nearest[:, 0] == coarse_of_row[sample[:5000]]).mean())
    log(f"structured index: PQ trained in {time.time() - t0:.0f} s; generating list = nearest centroid for {agree:.4f}")
    for r0 in range(0, spec.regions, chunk):
        x = keys[r0 : r0 + chunk].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        ids = np.arange(r0, r0 + x.shape[0], dtype=np.int64)
        assign = np.ascontiguousarray(coarse_of_row[r0 : r0 + chunk], dtype=np.int64)
        ivf.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        if (r0 // chunk) % 5 == 4:
            log(f"structured index: {r0 + x.shape[0]}/{spec.regions} encoded ({time.time() - t0:.0f} s)")
    faiss.copy_array_to_vector(np.arange(spec.regions, dtype=np.int64), index.id_map)
    index.ntotal, index.is_trained = spec.regions, True
    index.construct_rev_map()
    return index, {"list_agreement": agree, "seconds": time.time() - t0}


def fastscan_from(ivf: faiss.IndexIVFPQ, folder: Path, m: int, seed: int = 0, chunk: int = 100000,
                  log: Callable[[str], None] = print, metric: int | None = None) -> tuple[faiss.Index, dict]:
    """``IndexIDMap2(IndexIVFPQFastScan)`` with 4-bit codes, ``m`` sub-vectors, over the same lists as ``ivf``.

    ``metric``: the code metric (default ``ivf``'s; ``faiss.METRIC_INNER_PRODUCT`` = ``IndexConfig.metric
    "inner_product"``, whose query tables are shared by all lists of a query).

    The coarse quantizer (centroids) and every key's list are taken from ``ivf`` (an IVF-PQ built by
    ``bench/bank.py``, whose ids are the rows of ``keys.npy``), so the two indexes probe the same
    lists and differ only in the codes. The 4-bit PQ is trained by FAISS on 65,536 residuals; the
    keys are encoded into a 4-bit ``IndexIVFPQ`` with their known lists and converted to FastScan's
    block layout (what ``IndexConfig(kind="ivfpq_fastscan", pq_nbits=4)`` builds with its own k-means).
    """
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    n, d = keys.shape
    if ivf.ntotal != n:
        raise ValueError(f"the source index holds {ivf.ntotal} keys, keys.npy {n}")
    list_of_row = list_of_positions(ivf).astype(np.int64)  # the source index's ids are the rows of keys.npy
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(faiss.rev_swig_ptr(faiss.downcast_index(ivf.quantizer).get_xb(), ivf.nlist * d).reshape(ivf.nlist, d).copy())
    pq4 = faiss.IndexIVFPQ(quantizer, d, ivf.nlist, m, 4, ivf.metric_type if metric is None else metric)
    rng = np.random.default_rng([seed, 6])
    sample = np.sort(rng.choice(n, size=min(PQ_TRAIN, n), replace=False))
    train = keys[sample].astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True) + 1e-12
    t0 = time.time()
    pq4.train(train)  # the quantizer is full: FAISS trains only the PQ, on the residuals
    for r0 in range(0, n, chunk):
        x = keys[r0 : r0 + chunk].astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        ids = np.arange(r0, r0 + x.shape[0], dtype=np.int64)
        assign = np.ascontiguousarray(list_of_row[r0 : r0 + chunk])
        pq4.add_core(x.shape[0], faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        if (r0 // chunk) % 5 == 4:
            log(f"fastscan index: {r0 + x.shape[0]}/{n} encoded ({time.time() - t0:.0f} s)")
    fast = faiss.IndexIVFPQFastScan(pq4)  # shares pq4's quantizer: own it from here on
    fast.quantizer = quantizer
    quantizer.this.disown()
    fast.own_fields = True
    fast.ntotal = 0  # IndexIDMap2 wraps only an empty index; the lists hold ids = rows, so id_map is the identity
    index = faiss.IndexIDMap2(fast)
    fast.ntotal = n
    fast.this.disown()
    index.own_fields = True
    faiss.copy_array_to_vector(np.arange(n, dtype=np.int64), index.id_map)
    index.ntotal, index.is_trained = n, True
    index.construct_rev_map()
    return index, {"seconds": time.time() - t0, "m": m, "metric": int(pq4.metric_type)}
