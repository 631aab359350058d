"""One serving process of ``bench/bank.py`` (run as a child, so its memory is measured alone).

``python bench/bank_serve.py FOLDER INDEX --reader {mmap,pread,ram} --images N ...`` loads the
index (the only bank structure in RAM) and opens the two value stores, then runs the per-image
bank step of CorrCLIPv2 on N stand-in images, one CPU thread, and prints one JSON line: per-step
wall and CPU times per image (CPU time: this process's own, robust to a busy machine), the time of
one pass over the logits (``logits_pass``: the floor of any fusion) and the process's memory
(VmRSS, RssAnon, RssFile, VmHWM from /proc) at each phase. ``ram`` is the authors' loader: both value stores read whole into RAM. ``--rerank`` also opens
the key store (``keys.npy``) with the same reader for exact re-ranking; ``--rerank-with codes --refine
FILE.npz`` re-ranks with in-RAM residual codes instead (counted in the index's memory phase).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovseg_core.bank.config import FusionConfig, SearchConfig  # noqa: E402
from ovseg_core.bank.index import index_from_file  # noqa: E402
from ovseg_core.bank.pooling import region_queries  # noqa: E402
from ovseg_core.bank.refine import RefineCodes  # noqa: E402
from ovseg_core.bank.retrieval import ValueStore, fuse, support_logits  # noqa: E402
from ovseg_core.bank.rows import ArrayRows, NpyRows, PreadRows  # noqa: E402
from ovseg_core.bank.search import search_index  # noqa: E402

STEPS = ("query_pooling", "search", "values_and_logits", "fusion")
# Not a step: one in-place pass over the (Q, H, W) float32 logits, timed after each image's steps. Any fusion reads
# the image's own logits and writes the fused ones at least once, so no implementation of the step is faster.
FLOOR = "logits_pass"


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def voronoi_regions(rng: np.random.Generator, size: tuple[int, int], r: int) -> np.ndarray:
    """``(H, W) int64`` map of ``r`` regions (nearest of r random seeds), ids 0..r-1."""
    h, w = size
    seeds = rng.uniform(0, 1, (r, 2)) * np.array([h, w])
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return np.argmin(d, axis=-1).astype(np.int64)


def open_store(path: Path, reader: str, files: list):
    if reader == "ram":
        return ArrayRows(np.load(path))  # the authors' loader: the whole store in RAM
    f = open(path, "rb")  # noqa: SIM115 (kept open while serving)
    files.append(f)
    return NpyRows(f) if reader == "mmap" else PreadRows(f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("index", type=Path)
    p.add_argument("--reader", choices=("mmap", "pread", "ram"), default="mmap")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--queries", type=Path, required=True, help=".npy (images * R, D_key) unit queries")
    p.add_argument("--regions-per-image", type=int, default=25)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--nprobe", type=int, default=256)
    p.add_argument("--coarse-ef", type=int, default=None, help="efSearch of an HNSW coarse quantizer (default: nprobe)")
    p.add_argument("--coarse-dtype", choices=("float32", "bfloat16"), default="float32", help="SearchConfig.coarse_dtype")
    p.add_argument("--coarse-refine", type=int, default=0, help="SearchConfig.coarse_refine (with --coarse-dtype bfloat16)")
    p.add_argument("--rerank", type=int, default=0, metavar="CANDIDATES",
                   help="exact re-ranking of this many candidates with the stored keys (keys.npy, same reader); 0 = off")
    p.add_argument("--rerank-with", choices=("keys", "codes"), default="keys",
                   help="SearchConfig.rerank_with: codes = in-RAM residual PQ codes (--refine), no key reads")
    p.add_argument("--refine", type=Path, default=None, help=".npz of the index's re-ranking codes (ovseg_core.bank.refine)")
    p.add_argument("--fastscan-implem", type=int, default=0, help="SearchConfig.fastscan_implem")
    p.add_argument("--classes", type=int, default=171)
    p.add_argument("--size", type=int, nargs=2, default=(448, 448))
    p.add_argument("--vfm-grid", type=int, nargs=2, default=(28, 28))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    # the image-side inputs first, so the memory phases below show the bank's own share
    rng = np.random.default_rng(7)
    qs = np.load(a.queries)
    dim_key = qs.shape[1]
    qs = qs.reshape(-1, a.regions_per_image, dim_key)
    maps = [voronoi_regions(rng, tuple(a.size), a.regions_per_image) for _ in range(4)]
    vfm = [torch.randn(dim_key, *a.vfm_grid) for _ in range(2)]
    own = torch.randn(a.classes, *a.size)
    mem = {"start": memory()}
    with open(a.index, "rb") as f:
        bank = index_from_file(f, reverse_map=False)  # serving needs no id -> position map
    if a.refine is not None:
        with np.load(a.refine) as z:
            bank.refine = RefineCodes.from_arrays({k: z[k] for k in z.files})
    mem["index_loaded"] = memory()
    files: list = []
    main_rows = open_store(a.folder / "main.npy", a.reader, files)
    aux_rows = open_store(a.folder / "aux.npy", a.reader, files)
    key_rows = open_store(a.folder / "keys.npy", a.reader, files) if a.rerank and a.rerank_with == "keys" else None
    mem["stores_opened"] = memory()
    stores = [
        ValueStore(main_rows, torch.nn.functional.normalize(torch.randn(a.classes, main_rows.dim), dim=1)),
        ValueStore(aux_rows, torch.nn.functional.normalize(torch.randn(a.classes, aux_rows.dim), dim=1)),
    ]
    search_cfg = SearchConfig(k=a.k, nprobe_max=a.nprobe, coarse_ef_search=a.coarse_ef, coarse_dtype=a.coarse_dtype,
                              coarse_refine=a.coarse_refine, rerank=a.rerank > 0, rerank_candidates=max(a.rerank, 1),
                              rerank_with=a.rerank_with, fastscan_implem=a.fastscan_implem)
    fusion_cfg = FusionConfig()
    search_index(bank, qs[0], search_cfg, key_rows)  # builds the search table once (not timed)
    mem["first_search"] = memory()
    times = {s: [] for s in STEPS + (FLOOR,)}
    cpu = {s: [] for s in STEPS + (FLOOR,)}
    for i in range(a.images):
        region_map = maps[i % len(maps)]
        marks = [(time.perf_counter(), time.process_time())]
        _, labels, _ = region_queries(vfm[i % len(vfm)], region_map)
        marks.append((time.perf_counter(), time.process_time()))
        neighbours = search_index(bank, qs[i % qs.shape[0]], search_cfg, key_rows)
        marks.append((time.perf_counter(), time.process_time()))
        logits, found = support_logits(neighbours, stores, fusion_cfg)
        marks.append((time.perf_counter(), time.process_time()))
        fuse(own, logits, labels, found, fusion_cfg, out=own)  # in place, as the reference
        marks.append((time.perf_counter(), time.process_time()))
        own.mul_(1.0)  # the floor: one in-place pass over the logits, less than any fusion that writes them does
        marks.append((time.perf_counter(), time.process_time()))
        for j, step in enumerate(STEPS + (FLOOR,)):
            times[step].append(marks[j + 1][0] - marks[j][0])
            cpu[step].append(marks[j + 1][1] - marks[j][1])
    mem["served"] = memory()
    print(json.dumps({"reader": a.reader, "images": a.images, "times": times, "cpu": cpu, "memory": mem,
                      "index": {"kind": bank.kind, "metric": bank.metric, "coarse": bank.coarse, "nlist": bank.nlist, "ntotal": bank.ntotal}}))


if __name__ == "__main__":
    main()
