"""The fast set-ups of ``bench/bank.py`` (``--options fast``, and appended to ``all``): FastScan implementations,
FastScan with 16- and 32-byte codes, in-RAM re-ranking codes, and where the time of one search goes.

Every row searches the same recall queries (R per image) on one thread and reports the median wall / CPU ms
per image and recall@K against exact search (rows that time a part of the search report no recall).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from typing import Any

import faiss
import numpy as np
import torch

import ovseg_core.bank.search as bank_search
from ovseg_core.bank.config import SearchConfig
from ovseg_core.bank.index_object import BankIndex
from ovseg_core.bank.refine import RefineCodes, build_refine_codes
from ovseg_core.bank.rows import PreadRows

log = logging.getLogger("ovseg.bench.bank")
Option = tuple[str, Callable[[np.ndarray], np.ndarray | None], int, int | None, Any]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found (-1 never matches)."""
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / e.shape[0] for f, e in zip(found, exact)]))


def timed_rows(options: list[Option], q: np.ndarray, exact: np.ndarray, r: int, k: int) -> list[dict]:
    """One row per option ``(name, search(queries) -> ids or None, images per call, at most this many images,
    context manager class or None)``: median wall / CPU ms per image over the images, recall@k (when ids)."""
    rows = []
    n_all = q.shape[0] // r
    for name, fn, batch, max_images, context in options:
        n_img = n_all if max_images is None else min(max_images, n_all)
        found, wall, cpu = [], [], []
        for i in range(0, n_img, batch):
            j = min(i + batch, n_img)
            with context() if context else nullcontext():
                t0, c0 = time.perf_counter(), time.process_time()
                got = fn(q[i * r : j * r])
                wall.append((time.perf_counter() - t0) / (j - i))
                cpu.append((time.process_time() - c0) / (j - i))
            found.append(got)
        row = {"option": name, "images": n_img, "ms_per_image": 1000 * median(wall), "cpu_ms_per_image": 1000 * median(cpu)}
        if found[0] is not None:
            row["recall"] = recall(np.concatenate(found), exact[: n_img * r])
            row["found"] = np.concatenate(found)
        rows.append(row)
        log.info("%s: %.1f ms/image (CPU %.1f), recall@%d %s", name, row["ms_per_image"], row["cpu_ms_per_image"], k,
                 f"{row['recall']:.3f}" if "recall" in row else "-")
    return rows


def refine_variant(bank: BankIndex, folder: Path, path: Path, m: int) -> tuple[RefineCodes, float]:
    """In-RAM re-ranking codes of ``bank`` (ids = rows of ``keys.npy``), cached as ``path`` (.npz)."""
    if path.exists():
        with np.load(path) as z:
            return RefineCodes.from_arrays({k: z[k] for k in z.files}), 0.0
    t0 = time.time()
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    codes = build_refine_codes(bank, keys, np.arange(keys.shape[0], dtype=np.int64), m)
    seconds = time.time() - t0
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **codes.arrays())
    tmp.replace(path)
    log.info("re-ranking codes m %d: %.0f s, %.0f MiB", m, seconds, codes.nbytes / 2**20)
    return codes, seconds


def _coarse_parts(bank: BankIndex, probes: int) -> list[Option]:
    """Rows timing the coarse step alone: the bfloat16 product, the top-nprobe selection, and both."""
    cent16 = bank.centroids_bf16()

    def product(q: np.ndarray) -> None:
        with torch.no_grad():
            (torch.from_numpy(q).to(torch.bfloat16) @ cent16.T).float().numpy()

    def product_topk(q: np.ndarray) -> None:
        with torch.no_grad():
            torch.topk(torch.from_numpy(q).to(torch.bfloat16) @ cent16.T, probes, dim=1)

    cfg = SearchConfig(nprobe_max=probes, coarse_dtype="bfloat16")
    return [
        ("coarse step only: bfloat16 product", product, 1, None, None),
        ("coarse step only: bfloat16 product + top nprobe (argpartition + sort, the search's)",
         lambda q: (bank_search.coarse_lists(bank, q, probes, cfg), None)[1], 1, None, None),
        ("coarse step only: bfloat16 product + torch.topk on the bfloat16 scores", product_topk, 1, None, None),
        ("coarse step only: float32 product + top nprobe (the default's)",
         lambda q: (bank_search.coarse_lists(bank, q, probes), None)[1], 1, None, None),
    ]


def fast_table(variants: dict[int, BankIndex], refine: dict[tuple[int, int], RefineCodes], folder: Path, q: np.ndarray,
               exact: np.ndarray, a: Any) -> list[dict]:
    """The fast set-ups' rows: ``variants`` = FastScan IP index per m, ``refine`` = codes per (FastScan m, refine m)."""
    faiss.omp_set_num_threads(1)
    r, k = a.regions_per_image, a.k
    s = SearchConfig
    options: list[Option] = []
    with open(folder / "keys.npy", "rb") as f:
        keys = PreadRows(f)
        for m, bank in variants.items():
            fs = f"FastScan 4-bit m {m} IP, bfloat16 coarse step"

            def run(cfg: SearchConfig, bank: BankIndex = bank, codes: RefineCodes | None = None) -> Callable:
                def go(qq: np.ndarray) -> np.ndarray:
                    bank.refine = codes
                    return bank_search.search_index(bank, qq, cfg, keys)
                return go

            bf = dict(k=k, nprobe_max=a.nprobe, coarse_dtype="bfloat16")
            bank_search.search_index(bank, q[:r], s(**bf))  # caches (bfloat16 centroids), once
            implems = (0, 10, 11, 13, 14, 15) if m == a.fastscan_m else (0,)
            for implem in implems:
                name = f"{fs}" + (f", FAISS implem {implem}" if implem else " (FAISS's implem: 12 for k <= 20)")
                options.append((name, run(s(**bf, fastscan_implem=implem)), 1, None, None))
            options.append((f"{fs} + exact re-rank of 40 (keys read from disk)", run(s(**bf, rerank=True, rerank_candidates=40)), 1, None, None))
            for (fm, rm), codes in refine.items():
                if fm != m:
                    continue
                for c in (40, 100):
                    cfg = s(**bf, rerank=True, rerank_candidates=c, rerank_with="codes")
                    options.append((f"{fs} + re-rank of {c} with in-RAM codes m {rm} ({rm} B/key)", run(cfg, codes=codes), 1, None, None))
                    if c == 100 and rm == max(a.refine_m):
                        options.append((f"{fs} + re-rank of {c} with in-RAM codes m {rm}, 8 images per call",
                                        run(cfg, codes=codes), 8, None, None))
        options += _coarse_parts(variants[a.fastscan_m], min(a.nprobe, variants[a.fastscan_m].nlist))
        rows = timed_rows(options, q, exact, r, k)
    for bank in variants.values():
        bank.refine = None
    for row in rows:
        row.pop("found", None)
    return rows
