"""Memory banks in the store: the append-only region registry and the value rows read by region id.

Layout (relative to the store root)::

    banks/<bank>/registry-<regions key>.json   region registry: images in arrival order, each with its first
                                               region id and region count (ids = rows of every store)

**Registry**: region ids never change as a bank grows. New images are appended sorted by image
id, their ids contiguous (the authors' ``build_manifest.py``, keyed by content-addressed image
ids instead of file stems); an image that left the bank keeps its ids (they are not indexed). One
registry per bank and region source (``sam_masks`` key): other regions are other ids. Written
atomically (readers see the old or the new registry) by the one ``bank_index`` item that holds
the bank's lease.

**Value rows** (``StoreRows``, an ``ovseg_core.bank.rows.RowReader``): the retrieved region ids
are mapped to (image, row) through the registry and read from the images' ``bank_values`` items,
one checked ranged read per image holding a retrieved row (the item's ``values`` array only): a
serving process never loads a value store whole. Serving reads a built bank's row segments
(``storage.bank_rows``, ~100x faster for scattered ids); this reader serves index items written
before the segments existed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.store import Store

BANKS = "banks"
REGISTRY_FORMAT = 1


@dataclass(frozen=True)
class Registry:
    """Images in arrival order with their first region id and region count."""

    images: tuple[str, ...] = ()
    first: tuple[int, ...] = ()
    count: tuple[int, ...] = ()

    @property
    def n_regions(self) -> int:
        return int(self.first[-1] + self.count[-1]) if self.images else 0

    def position(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.images)}

    def extended(self, counts: Mapping[str, int]) -> "Registry":
        """This registry with the images of ``counts`` it lacks appended, sorted by image id."""
        known = set(self.images)
        new = sorted(i for i in counts if i not in known)
        images, first, count = list(self.images), list(self.first), list(self.count)
        nxt = self.n_regions
        for iid in new:
            images.append(iid)
            first.append(nxt)
            count.append(int(counts[iid]))
            nxt += int(counts[iid])
        return Registry(tuple(images), tuple(first), tuple(count))

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(image position, row within the image)`` of region ids ``(n,) int64`` (each < ``n_regions``)."""
        first = np.asarray(self.first, dtype=np.int64)
        pos = np.searchsorted(first, ids, side="right") - 1
        return pos, ids - first[pos]

    def to_array(self) -> np.ndarray:
        """``(n_images, 2) int64``: first id and count per image (stored with the index)."""
        return np.stack([np.asarray(self.first, np.int64), np.asarray(self.count, np.int64)], axis=1).reshape(-1, 2)


def registry_path(store: Store, bank: str, regions_key: str) -> str:
    return store.backend.path(BANKS, bank, f"registry-{regions_key}.json")


def read_registry(store: Store, bank: str, regions_key: str) -> Registry:
    """The bank's registry for these regions (empty when the bank has none yet)."""
    path = registry_path(store, bank, regions_key)
    if not store.backend.exists(path):
        return Registry()
    doc = json.loads(store.backend.get(path))
    if doc.get("format") != REGISTRY_FORMAT:
        raise ValueError(f"{path}: registry format {doc.get('format')!r}, this ovseg reads {REGISTRY_FORMAT}")
    rows = doc["images"]
    return Registry(tuple(r[0] for r in rows), tuple(int(r[1]) for r in rows), tuple(int(r[2]) for r in rows))


def write_registry(store: Store, bank: str, regions_key: str, reg: Registry, attrs: Mapping[str, Any]) -> None:
    """Replace the registry atomically; ``attrs`` (models, settings) are recorded beside it."""
    doc = {"format": REGISTRY_FORMAT, "bank": bank, "regions_key": regions_key, "regions": reg.n_regions,
           **dict(attrs), "images": [[i, f, c] for i, f, c in zip(reg.images, reg.first, reg.count)]}
    store.backend.mkdirs(store.backend.path(BANKS, bank))
    store.backend.put_atomic(registry_path(store, bank, regions_key), json.dumps(doc).encode())


def bank_names(store: Store) -> list[str]:
    return sorted(store.backend.subfolders(store.backend.path(BANKS)))


def registry_files(store: Store, bank: str) -> list[str]:
    return sorted(n for n in store.backend.listdir(store.backend.path(BANKS, bank)) if n.startswith("registry-"))


class StoreRows:
    """``RowReader`` over a bank's per-image ``bank_values`` items: reads only the images holding asked rows."""

    def __init__(self, store: Store, stage: str, key: str, images: Iterable[str], first: np.ndarray, count: np.ndarray,
                 dim: int, array: str = "values"):
        self.store, self.stage, self.key, self.array = store, stage, key, array
        self.images = tuple(images)
        self.first = np.asarray(first, np.int64)
        self.count = np.asarray(count, np.int64)
        self.n_rows = int(self.first[-1] + self.count[-1]) if len(self.first) else 0
        self.dim = int(dim)
        self.dtype = np.dtype("float16")
        self.images_read = 0  # items read so far (for tests and the report)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= self.n_rows)):
            raise ValueError(f"row ids must be a 1-D array in 0..{self.n_rows - 1}")
        out = np.empty((ids.size, self.dim), dtype=self.dtype)
        pos = np.searchsorted(self.first, ids, side="right") - 1
        for p in np.unique(pos):
            sel = np.nonzero(pos == p)[0]
            rows = self.store.read_item(self.stage, self.key, self.images[p], [self.array])[self.array]
            self.images_read += 1
            out[sel] = rows[ids[sel] - self.first[p]]
        return out
