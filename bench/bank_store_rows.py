"""Value-row reads from the store (``python bench/bank_store_rows.py``): a retrieval's K x R rows per image read
through ``storage.bank.StoreRows`` from a built bank's per-image ``bank_values`` items, through the same bank's
row segments in region-id order (``storage.bank_rows``: what a built bank's ``bank_index`` item writes and serving
reads; consolidated here first for 90 % of the images, then grown to all, both timed) and from an imported store
(``flows.bank_import.import_values`` of a synthetic authors' ``.pt``), on the same random fp16 unit rows.

Stand-in: ``--regions`` rows of ``--dim`` (768: the -L bank's CLIP), ``--per-image`` regions per built image (COCO:
~25), 64 images per pack (a batch). Per served image: ``--r`` x ``--k`` uniformly random region ids (scattered, as
retrieval over a large bank is). Prints the median and mean per-image read time and the items read per image (also runs on ovseg before the
row file, whose import wrote 1,024-row items: the before/after figures of docs/banks.md section 6).
The store is cached under ``--out`` (rebuilt with ``--rebuild``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from statistics import mean, median
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.bank_import import import_values  # noqa: E402
from storage.bank import StoreRows  # noqa: E402
from storage.keys import StageKey  # noqa: E402
from storage.store import Store  # noqa: E402

try:
    from storage.row_files import FileRows  # noqa: E402
except ImportError:  # ovseg before the row file (before/after figures)
    FileRows = None
try:
    from storage.bank_rows import SegmentRows, consolidate_values  # noqa: E402
except ImportError:  # ovseg before the row segments (before/after figures)
    SegmentRows = consolidate_values = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regions", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--per-image", type=int, default=25)
    p.add_argument("--images", type=int, default=30, help="images served (timed)")
    p.add_argument("--r", type=int, default=25, help="regions per served image")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default="/tmp/ovseg-bench-store-rows")
    p.add_argument("--rebuild", action="store_true")
    return p.parse_args(argv)


def _node(stage_key: StageKey) -> SimpleNamespace:
    return SimpleNamespace(stage=stage_key.stage, key=stage_key.key, stage_key=stage_key)


def build(out: Path, n: int, dim: int, per_image: int) -> None:
    """The stand-in rows (chunked, never whole in RAM beyond one chunk) as a built and as an imported store."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store = Store(out / "store")
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, dim), dtype=np.float32)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    torch.save(torch.from_numpy(rows), out / "bench_clip.pt")
    built = StageKey("bank_values", {"bench": "built", "dim": dim})
    pack = None
    for i, first in enumerate(range(0, n, per_image)):
        pack = pack or store.open_pack(built)
        chunk = rows[first:first + per_image]
        ids = np.arange(1, chunk.shape[0] + 1, dtype=np.int64)
        pack.add(f"img-{i:07d}", {"values": chunk, "mask_ids": ids, "areas": ids}, {})
        if len(pack.entries) == 64:
            pack.commit()
            pack = None
    if pack is not None:
        pack.commit()
    del rows
    import_values(store, _node(StageKey("bank_values", {"bench": "imported", "dim": dim})), str(out / "bench_clip.pt"),
                  None)


def readers(out: Path, n: int, dim: int, per_image: int) -> dict[str, Any]:
    """The two stores' row readers as retrieval builds them (``tasks.bank_index._rows``)."""
    store = Store(out / "store")
    built = StageKey("bank_values", {"bench": "built", "dim": dim})
    items = sorted(store.complete_items(built.stage, built.key))
    counts = np.full(len(items), per_image, np.int64)
    counts[-1] = n - per_image * (len(items) - 1)
    firsts = np.arange(len(items)) * per_image
    got: dict[str, Any] = {"built": StoreRows(store, built.stage, built.key, items, firsts, counts, dim)}
    if consolidate_values is not None:  # what the bank_index item writes: 90 % of the images, then the bank grown
        for share in (0.9, 1.0):
            part = items[: int(round(share * len(items)))]
            t0 = time.perf_counter()
            rs, written = consolidate_values(store, built.stage, built.key, "bench", "regions", items, firsts, counts,
                                             part)
            print(f"row segments of {share:.0%} of the images: {written} rows written in "
                  f"{time.perf_counter() - t0:.1f} s, {len(rs.segments)} segment(s)")
        got["built, row segments"] = SegmentRows(store, rs)
    imported = StageKey("bank_values", {"bench": "imported", "dim": dim})
    chunks = sorted(store.complete_items(imported.stage, imported.key))
    if FileRows is not None and chunks == ["rows"]:
        got["imported"] = FileRows(store, imported.stage, imported.key)
    else:  # ovseg before the row file: 1,024-row items ``rows-<first row>`` (for before/after figures)
        firsts = np.array([int(c.split("-")[1]) for c in chunks], np.int64)
        got["imported"] = StoreRows(store, imported.stage, imported.key, chunks, firsts, np.diff(np.append(firsts, n)),
                                    dim)
    return got


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out = Path(a.out)
    if a.rebuild or not (out / "store").exists():
        t0 = time.perf_counter()
        build(out, a.regions, a.dim, a.per_image)
        print(f"built the stand-in stores in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(1)
    queries = [rng.integers(0, a.regions, a.r * a.k) for _ in range(a.images + 2)]
    print(f"| store ({a.regions} rows of {a.dim}) | ms per image, median | mean | items read per image |")
    print("|---|---|---|---|")
    for kind, rows in readers(out, a.regions, a.dim, a.per_image).items():
        times = []
        for i, ids in enumerate(queries):
            t0 = time.perf_counter()
            got = rows.rows(np.unique(ids))
            if i >= 2:  # two warm-up images
                times.append(time.perf_counter() - t0)
            assert got.shape == (np.unique(ids).size, a.dim)
        items = f"{rows.images_read / len(queries):.0f}" if hasattr(rows, "images_read") else "- (positioned reads)"
        print(f"| {kind} | {1e3 * median(times):.1f} | {1e3 * mean(times):.1f} | {items} |")


if __name__ == "__main__":
    main()
