"""Memory-bank benchmark (``python bench/bank.py``): CorrCLIPv2 retrieval + fusion on a stand-in bank.

Figures of issue 22 that need no store: per-image retrieval + fusion time (R regions, K
neighbours, IVF-PQ nprobe, one CPU thread; median over images), resident memory of a process
serving the bank with two value stores (memory-mapped, positioned reads, and the authors'
load-everything approach when it fits), recall@K of the index against exact search beside the
latency of each search option, and recall after a 10 % extension with and without retraining.

The stand-in (``bench/bank_standin.py``): clustered random keys (D_key 1024), random unit values
(768 main + 512 auxiliary, fp16), memory-mapped ``.npy`` files cached under ``--out``. Index
build ``--build train`` = the authors' build (k-means on all N keys; hours at 2.9M on 2 cores),
``structured`` = the same index structure without k-means (see ``bank_standin``), ``auto`` =
train up to 300k regions. Results: ``<out>/bank-n<regions>.json`` and ``.md`` (printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bank_standin as standin  # noqa: E402
from bank_fast import fast_table, recall, refine_variant, timed_rows  # noqa: E402
from bank_report import report  # noqa: E402

import ovseg_core.bank.search as bank_search  # noqa: E402
from ovseg_core.bank.config import IndexConfig, SearchConfig  # noqa: E402
from ovseg_core.bank.index import (  # noqa: E402
    BankIndex,
    add_keys,
    build_index,
    index_from_bytes,
    index_from_file,
    index_to_bytes,
    use_hnsw_coarse,
)
from ovseg_core.bank.rows import PreadRows  # noqa: E402
from ovseg_core.bank.search import search_index  # noqa: E402

log = logging.getLogger("ovseg.bench.bank")
GIB = 2**30
TRAIN_LIMIT = 300_000  # --build auto trains (k-means) up to this many regions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=int, default=2_900_000, help="bank regions N (the COCO bank: ~2.9M)")
    p.add_argument("--build", choices=("auto", "train", "structured"), default="auto")
    p.add_argument("--images", type=int, default=200, help="images served per process (timing and RSS)")
    p.add_argument("--recall-images", type=int, default=20, help="images (x R queries) for recall and the option table")
    p.add_argument("--regions-per-image", type=int, default=25)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--nprobe", type=int, default=256)
    p.add_argument("--serve-hnsw", type=int, nargs=2, default=(16, 64), metavar=("NPROBE", "EF"),
                   help="also serve with the HNSW coarse quantizer at this nprobe and efSearch (pread reader)")
    p.add_argument("--fastscan-m", type=int, default=64, help="sub-vectors of the 4-bit FastScan variant (IndexConfig.kind ivfpq_fastscan)")
    p.add_argument("--serve-fast", type=int, default=40, metavar="CANDIDATES",
                   help="also serve with the fast option: FastScan, bfloat16 coarse step, exact re-rank of this many (0: skip)")
    p.add_argument("--options", choices=("all", "fast"), default="all",
                   help="search-option table: all rows, or only the fast set-ups (FastScan, in-RAM re-ranking codes; "
                        "skips the HNSW and L2-FastScan variants and their builds)")
    p.add_argument("--fastscan-small-m", type=int, default=32, help="also a FastScan variant with this many sub-vectors (0: none)")
    p.add_argument("--refine-m", type=int, nargs="*", default=None,
                   help="in-RAM re-ranking codes (SearchConfig.rerank_with codes) of these byte sizes (residuals to the lists' "
                        "centroids, which the FastScan variants share; each must divide the key dimension; default 128, "
                        "or half the key dimension where 128 does not divide it)")
    p.add_argument("--serve-codes", type=int, nargs=2, default=None, metavar=("REFINE_M", "CANDIDATES"),
                   help="also serve with FastScan m --fastscan-m, bfloat16 coarse step, re-ranking CANDIDATES with in-RAM codes of REFINE_M bytes")
    p.add_argument("--classes", type=int, default=171, help="text queries Q (COCO-Stuff: 171)")
    p.add_argument("--size", type=int, nargs=2, default=(448, 448), help="network-input H W")
    p.add_argument("--dims", type=int, nargs=3, default=(1024, 768, 512), metavar=("KEY", "MAIN", "AUX"))
    p.add_argument("--readers", nargs="*", default=["mmap", "pread", "ram"], choices=("mmap", "pread", "ram"))
    p.add_argument("--extension", choices=("auto", "yes", "no"), default="auto", help="the 10 %% extension study (auto: when training)")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    a = p.parse_args(argv)
    if min(a.regions, a.images, a.recall_images, a.regions_per_image, a.k, a.nprobe, a.classes) < 1:
        p.error("counts must be >= 1")
    if a.dims[0] % 32:
        p.error("the key dimension must be a multiple of pq_m = 32")
    if a.refine_m is None:
        a.refine_m = [128 if a.dims[0] % 128 == 0 else a.dims[0] // 2]
    if any(m < 1 or a.dims[0] % m for m in a.refine_m):
        p.error(f"--refine-m {a.refine_m}: each must divide the key dimension {a.dims[0]}")
    return a


def load_or_build(folder: Path, spec: standin.Spec, build: str) -> tuple[BankIndex, dict[str, Any]]:
    path = folder / f"index-{build}.faiss"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        with open(path, "rb") as f:
            return index_from_file(f), json.loads(info_path.read_text())
    t0 = time.time()
    if build == "train":
        keys = np.load(folder / "keys.npy", mmap_mode="r")
        bank = build_index(keys, cfg=IndexConfig())
        info = {"build": "train", "seconds": time.time() - t0}
    else:
        index, info = standin.structured_index(folder, spec, log=log.info)
        bank = BankIndex(index)
        info["build"] = "structured"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(index_to_bytes(bank))
    os.replace(tmp, path)
    info["bytes"] = path.stat().st_size
    info_path.write_text(json.dumps(info))
    return bank, info


def fastscan_variant(bank: BankIndex, folder: Path, path: Path, m: int, metric: int) -> tuple[BankIndex, float]:
    """The 4-bit FastScan index over the same lists (``bank_standin.fastscan_from``), cached beside it."""
    if path.exists():
        with open(path, "rb") as f:
            return index_from_file(f), 0.0
    t0 = time.time()
    index, _ = standin.fastscan_from(bank.inner, folder, m, log=log.info, metric=metric)
    fast = BankIndex(index)
    seconds = time.time() - t0
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(index_to_bytes(fast))
    os.replace(tmp, path)
    return fast, seconds


def same_lists(bank: BankIndex, q: np.ndarray, a: argparse.Namespace) -> dict[str, float]:
    """Fraction of queries whose bfloat16 coarse step probes the same set of lists as the float32 one."""
    _, ref = bank_search.coarse_lists(bank, q, min(a.nprobe, bank.nlist))
    out = {}
    for refine in (0, 1, 2):
        cfg = SearchConfig(nprobe_max=a.nprobe, coarse_dtype="bfloat16", coarse_refine=refine)
        _, got = bank_search.coarse_lists(bank, q, min(a.nprobe, bank.nlist), cfg)
        out[f"refine {refine}"] = float(np.mean([set(x.tolist()) == set(y.tolist()) for x, y in zip(ref, got)]))
    return out


def hnsw_variant(bank: BankIndex, path: Path) -> tuple[BankIndex, float]:
    """The same index with an HNSW coarse quantizer (``IndexConfig.coarse="hnsw"``, FAISS defaults M 32, efC 40),
    cached beside it; returns it and its build seconds (0 when cached)."""
    if path.exists():
        with open(path, "rb") as f:
            return index_from_file(f), 0.0
    t0 = time.time()
    hnsw = use_hnsw_coarse(index_from_bytes(index_to_bytes(bank)))
    seconds = time.time() - t0
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(index_to_bytes(hnsw))
    os.replace(tmp, path)
    return hnsw, seconds


class _FaissFlatCoarse:
    """Within the block the precomputed path's coarse step is FAISS's own flat-quantizer search (the path before
    2026-12-07: FAISS's non-BLAS loop for fewer than ``distance_compute_blas_threshold`` queries)."""

    def __enter__(self) -> None:
        self.saved = bank_search.coarse_lists
        bank_search.coarse_lists = lambda bank, queries, probes, cfg=None: bank.inner.quantizer.search(queries, probes)

    def __exit__(self, *exc: object) -> None:
        bank_search.coarse_lists = self.saved


def cached(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path)
    arr = make()
    np.save(path, arr)
    return arr


def option_table(bank: BankIndex, hnsw: BankIndex, fast: BankIndex, fast_l2: BankIndex, folder: Path, q: np.ndarray,
                 exact: np.ndarray, a: argparse.Namespace) -> list[dict]:
    """Recall@k and search time per image (R queries, one thread) for each search option."""
    faiss.omp_set_num_threads(1)
    r = a.regions_per_image
    default = SearchConfig(k=a.k, nprobe_max=a.nprobe)
    with open(folder / "keys.npy", "rb") as f:
        keys = PreadRows(f)
        s = SearchConfig
        bf16, fs = s(k=a.k, nprobe_max=a.nprobe, coarse_dtype="bfloat16", coarse_refine=2), f"FastScan 4-bit m {a.fastscan_m} IP, nprobe {a.nprobe}"
        fast_cfg = {c: s(k=a.k, nprobe_max=a.nprobe, coarse_dtype="bfloat16", coarse_refine=0, rerank=c > 0, rerank_candidates=max(c, 1))
                    for c in (0, 20, 40, 100)}
        options = [  # (name, index, config, images per search call, at most this many images, context)
            (f"IVF-PQ nprobe {a.nprobe} (default)", bank, default, 1, None, None),
            (f"IVF-PQ nprobe {a.nprobe}, 8 images per search call", bank, default, 8, None, None),
            (f"IVF-PQ nprobe {a.nprobe}, coarse step by FAISS's flat search (before)", bank, default, 1, None, _FaissFlatCoarse),
            (f"IVF-PQ nprobe {a.nprobe}, FAISS's own CPU search", bank, s(k=a.k, nprobe_max=a.nprobe, search="faiss"), 1, 3, None),
            ("IVF-PQ nprobe 64", bank, s(k=a.k, nprobe_max=64), 1, None, None),
            ("IVF-PQ nprobe 16", bank, s(k=a.k, nprobe_max=16), 1, None, None),
            ("IVF-PQ nprobe 16, 8 images per search call", bank, s(k=a.k, nprobe_max=16), 8, None, None),
            (f"HNSW coarse, nprobe {a.nprobe} (efSearch {a.nprobe})", hnsw, default, 1, None, None),
            ("HNSW coarse, nprobe 64 (efSearch 64)", hnsw, s(k=a.k, nprobe_max=64), 1, None, None),
            ("HNSW coarse, nprobe 16, efSearch 64", hnsw, s(k=a.k, nprobe_max=16, coarse_ef_search=64), 1, None, None),
            ("HNSW coarse, nprobe 16 (efSearch 16)", hnsw, s(k=a.k, nprobe_max=16), 1, None, None),
            ("HNSW coarse, nprobe 8, efSearch 32", hnsw, s(k=a.k, nprobe_max=8, coarse_ef_search=32), 1, None, None),
            ("HNSW coarse, nprobe 16, efSearch 64, 8 images per search call", hnsw, s(k=a.k, nprobe_max=16, coarse_ef_search=64), 8, None, None),
            (f"IVF-PQ nprobe {a.nprobe} + exact re-rank of 100", bank, s(k=a.k, nprobe_max=a.nprobe, rerank=True), 1, None, None),
            ("IVF-PQ nprobe 16 + exact re-rank of 100", bank, s(k=a.k, nprobe_max=16, rerank=True), 1, None, None),
            (f"IVF-PQ nprobe {a.nprobe}, bfloat16 coarse step + float32 re-score of 2 x nprobe lists", bank, bf16, 1, None, None),
            (f"IVF-PQ nprobe {a.nprobe}, bfloat16 coarse step, no re-score", bank, fast_cfg[0], 1, None, None),
            (f"FastScan 4-bit m {a.fastscan_m} with the reference's L2 code metric, nprobe {a.nprobe}", fast_l2, default, 1, None, None),
            (fs, fast, default, 1, None, None),
            (f"{fs}, bfloat16 coarse step (no re-score)", fast, fast_cfg[0], 1, None, None),
            (f"{fs}, bfloat16 coarse step + exact re-rank of 20", fast, fast_cfg[20], 1, None, None),
            (f"{fs}, bfloat16 coarse step + exact re-rank of 40", fast, fast_cfg[40], 1, None, None),
            (f"{fs}, bfloat16 coarse step + exact re-rank of 40, 8 images per call", fast, fast_cfg[40], 8, None, None),
            (f"{fs}, bfloat16 coarse step + exact re-rank of 100", fast, fast_cfg[100], 1, None, None),
        ]
        if a.options == "fast":  # the default and the FastScan rows only
            options = options[:1] + [o for o in options if o[1] is fast]
        for index in {id(o[1]): o[1] for o in options}.values():
            search_index(index, q[:r], default)  # the search tables, once
        timed = [(name, lambda qq, index=index, cfg=cfg: search_index(index, qq, cfg, keys), batch, max_images, context)
                 for name, index, cfg, batch, max_images, context in options]
        rows = timed_rows(timed, q, exact, r, a.k)
        default_found = rows[0]["found"]
        for row, (_, index, cfg, *_rest) in zip(rows, options):
            found = row.pop("found")
            if row is not rows[0] and index is bank and cfg.nprobe_max == a.nprobe and not cfg.rerank:
                row["same_neighbours_as_default"] = bool((found == default_found[: row["images"] * r]).all())
    return rows


def serve(folder: Path, index_path: Path, queries_path: Path, reader: str, a: argparse.Namespace,
          nprobe: int | None = None, coarse_ef: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "bank_serve.py"), str(folder), str(index_path), "--reader", reader,
           "--images", str(a.images), "--queries", str(queries_path), "--regions-per-image", str(a.regions_per_image),
           "--k", str(a.k), "--nprobe", str(nprobe or a.nprobe), "--classes", str(a.classes), "--size", *map(str, a.size),
           "--vfm-grid", str(a.size[0] // 16), str(a.size[1] // 16)] + (["--coarse-ef", str(coarse_ef)] if coarse_ef else []) + list(extra)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    if done.returncode:
        raise RuntimeError(f"serving process ({reader}) failed: {done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("times", "cpu"):  # medians over images, in ms
        per_step = out.pop(kind)
        totals = [sum(v[i] for step, v in per_step.items() if step != "logits_pass") for i in range(a.images)]
        retrieval = [per_step["search"][i] + per_step["values_and_logits"][i] for i in range(a.images)]
        out["ms" if kind == "times" else "cpu_ms"] = {
            **{s: 1000 * median(v) for s, v in per_step.items()},
            "retrieval": 1000 * median(retrieval), "total": 1000 * median(totals)}
    return out


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def extension_study(folder: Path, spec: standin.Spec, q: np.ndarray, exact: np.ndarray, a: argparse.Namespace,
                    default: BankIndex) -> dict:
    """Recall after adding 10 % more regions: added without retraining (the reference) vs retrained."""
    faiss.omp_set_num_threads(a.build_threads)
    keys = np.load(folder / "keys.npy", mmap_mode="r")
    n0 = round(spec.regions / 1.1)
    cfg = SearchConfig(k=a.k, nprobe_max=a.nprobe)
    out = {"base_regions": n0, "added_regions": spec.regions - n0}
    base = build_index(keys[:n0])
    add_keys(base, keys[n0:], np.arange(n0, spec.regions))
    out["same_distribution"] = {"added_without_retraining": recall(search_index(base, q, cfg), exact),
                                "retrained_on_all": recall(search_index(default, q, cfg), exact)}
    # a new domain: the 10 % come from clusters the first build never saw
    new_spec = standin.Spec(spec.regions - n0, spec.dim_key, spec.dim_main, spec.dim_aux, seed=spec.seed + 1000)
    new_folder = standin.generate(new_spec, a.out, log=log.info)
    new_keys = np.load(new_folder / "keys.npy")
    all_keys = np.concatenate([np.asarray(keys[:n0]), new_keys])
    half = q.shape[0] // 2
    q_new = np.concatenate([q[:half], standin.queries(new_folder, q.shape[0] - half, a.seed + 1)])
    unit = all_keys.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True) + 1e-12
    exact_new = np.argsort(-(q_new @ unit.T), axis=1)[:, : a.k]
    base_new = build_index(keys[:n0])
    add_keys(base_new, new_keys, np.arange(n0, spec.regions))
    retrained = build_index(all_keys)
    for name, idx in (("added_without_retraining", base_new), ("retrained_on_all", retrained)):
        found = search_index(idx, q_new, cfg)
        out.setdefault("new_domain", {})[name] = {"old_queries": recall(found[:half], exact_new[:half]),
                                                  "new_queries": recall(found[half:], exact_new[half:])}
    return out


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    faiss.omp_set_num_threads(a.build_threads)
    a.out.mkdir(parents=True, exist_ok=True)
    spec = standin.Spec(a.regions, *a.dims, seed=a.seed)
    build = a.build if a.build != "auto" else ("train" if a.regions <= TRAIN_LIMIT else "structured")
    folder = standin.generate(spec, a.out, log=log.info)
    bank, info = load_or_build(folder, spec, build)
    log.info("index: %s, nlist %s, %d vectors", info["build"], bank.nlist, bank.ntotal)
    r = a.regions_per_image
    q_recall = cached(folder / f"queries-recall-{a.recall_images * r}-{a.seed}.npy",
                      lambda: standin.queries(folder, a.recall_images * r, a.seed))
    exact = cached(folder / f"exact-{a.recall_images * r}-{a.seed}-k{a.k}.npy", lambda: standin.exact_topk(folder, q_recall, a.k))
    serve_q = folder / f"queries-serve-{a.images * r}-{a.seed}.npy"
    cached(serve_q, lambda: standin.queries(folder, a.images * r, a.seed + 1))
    res: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                           "index": info, "index_nlist": bank.nlist,
                           "machine": f"{os.cpu_count()} logical CPUs, load {os.getloadavg()[0]:.1f} at start, faiss {faiss.__version__}"}
    everything = a.options == "all"
    hnsw, res["hnsw_build_seconds"] = hnsw_variant(bank, folder / f"index-{build}-hnsw.faiss") if everything else (None, 0.0)
    fast_path = folder / f"index-{build}-fastscan-ip-m{a.fastscan_m}.faiss"
    fast, res["fastscan_build_seconds"] = fastscan_variant(bank, folder, fast_path, a.fastscan_m, faiss.METRIC_INNER_PRODUCT)
    fast_l2 = (fastscan_variant(bank, folder, folder / f"index-{build}-fastscan-m{a.fastscan_m}.faiss", a.fastscan_m,
                                faiss.METRIC_L2)[0] if everything else None)
    variants = {a.fastscan_m: fast}
    if a.fastscan_small_m:
        variants[a.fastscan_small_m], _ = fastscan_variant(
            bank, folder, folder / f"index-{build}-fastscan-ip-m{a.fastscan_small_m}.faiss", a.fastscan_small_m, faiss.METRIC_INNER_PRODUCT)
    codes = {rm: refine_variant(fast, folder, folder / f"refine-{build}-r{rm}.npz", rm)[0] for rm in a.refine_m}
    refine = {(fm, rm): c for fm in variants for rm, c in codes.items()}  # the variants share the lists: same codes
    res["fastscan_bytes"] = fast_path.stat().st_size
    res["refine_bytes"] = {f"codes m {rm}": c.nbytes for rm, c in codes.items()}
    res["bf16_same_lists"] = same_lists(bank, q_recall, a)
    res["options"] = option_table(bank, hnsw, fast, fast_l2, folder, q_recall, exact, a)
    res["options"] += fast_table(variants, refine, folder, q_recall, exact, a)
    del hnsw, fast, fast_l2, variants, refine, codes
    res["serving"] = {}
    store_bytes = (folder / "main.npy").stat().st_size + (folder / "aux.npy").stat().st_size
    for reader in a.readers:
        if reader == "ram" and mem_available() < 1.5 * store_bytes + 2 * GIB:
            log.info("authors' load-everything reader skipped: %.1f GiB available, stores %.1f GiB", mem_available() / GIB, store_bytes / GIB)
            continue
        log.info("serving %d images with the %s reader", a.images, reader)
        res["serving"][reader] = serve(folder, folder / f"index-{build}.faiss", serve_q, reader, a)
    if a.serve_hnsw and everything:
        npb, ef = a.serve_hnsw
        log.info("serving %d images with the pread reader, HNSW coarse, nprobe %d, efSearch %d", a.images, npb, ef)
        res["serving"][f"pread, HNSW coarse nprobe {npb} ef {ef}"] = serve(
            folder, folder / f"index-{build}-hnsw.faiss", serve_q, "pread", a, npb, ef)
    if a.serve_fast:
        name = f"pread, FastScan m {a.fastscan_m} IP, bfloat16 coarse, exact re-rank of {a.serve_fast}"
        log.info("serving %d images: %s", a.images, name)
        res["serving"][name] = serve(folder, fast_path, serve_q, "pread", a,
                                     extra=("--coarse-dtype", "bfloat16", "--coarse-refine", "0", "--rerank", str(a.serve_fast)))
    if a.serve_codes:
        rm, cand = a.serve_codes
        name = f"pread, FastScan m {a.fastscan_m} IP, bfloat16 coarse, re-rank of {cand} with in-RAM codes m {rm}"
        log.info("serving %d images: %s", a.images, name)
        res["serving"][name] = serve(folder, fast_path, serve_q, "pread", a, extra=(
            "--coarse-dtype", "bfloat16", "--coarse-refine", "0", "--rerank", str(cand), "--rerank-with", "codes",
            "--refine", str(folder / f"refine-{build}-r{rm}.npz")))
    if a.extension == "yes" or (a.extension == "auto" and build == "train"):
        res["extension"] = extension_study(folder, spec, q_recall, exact, a, bank)
    res["machine"] += f", load {os.getloadavg()[0]:.1f} at end"
    (a.out / f"bank-n{a.regions}.json").write_text(json.dumps(res, indent=1))
    text = report(res)
    (a.out / f"bank-n{a.regions}.md").write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
