"""Completion records: what is done in one stage output set, read once per stage run.

Layout under ``stages/<stage>/<key>/``::

    packs/<pack>.zip        item data (``storage.packs``)
    records/<pack>.json     the pack's completion record, written LAST (atomic create): per item
                            its attrs, arrays (shape, dtype) and members (offset, size, CRC-32)
    drops/<id>.json         un-marks (item, pack) pairs: damaged outputs, ``--force``, ``cache verify --repair``
    index/<id>.parquet      compaction of many records and drops: (item, pack, dropped) rows

An item is complete when some record lists it and no drop names that (item, pack) pair; when
several packs hold it (a recomputation, or two runs that raced), the newest pack wins (pack ids
start with their creation time). Records are immutable; compaction only folds records' item
lists and drops into an index file, so a loader reads a few index files plus the records made
since, instead of every record. A file that cannot be parsed is reported (``damaged``) and its
items count as incomplete: one damaged file never stops a command.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.fsio import Backend, is_temporary
from storage.packs import ItemEntry

log = logging.getLogger("ovseg.storage")

RECORDS, DROPS, INDEX, PACKS = "records", "drops", "index", "packs"
RECORD_FORMAT = 1
_INDEX_SCHEMA = pa.schema([("item", pa.string()), ("pack", pa.string()), ("dropped", pa.bool_()),
                           ("pack_size", pa.int64())])
_RECORD_CACHE = 64


def new_id() -> str:
    """A unique id that sorts by creation time (pack, drop and index file names)."""
    return f"{time.time_ns():016x}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Record:
    """The completion record of one pack."""

    pack: str
    pack_size: int
    created: float
    items: Mapping[str, ItemEntry]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": RECORD_FORMAT, "pack": self.pack, "pack_size": self.pack_size,
                           "created": self.created, **dict(self.meta),
                           "items": {k: v.to_json() for k, v in self.items.items()}},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Record":
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a format-{RECORD_FORMAT} completion record")
        meta = {k: v for k, v in d.items() if k not in ("format", "pack", "pack_size", "created", "items")}
        return cls(str(d["pack"]), int(d["pack_size"]), float(d["created"]),
                   {k: ItemEntry.from_json(k, v) for k, v in d["items"].items()}, meta)


@dataclass
class Damage:
    """A file of the stage that could not be read, and why."""

    path: str
    error: str


class StageState:
    """The completion state of one ``(stage, key)``: loaded once, refreshed incrementally.

    Args:
        backend: the store's file backend.
        base: the stage output set's folder (``<root>/stages/<stage>/<key>``).
    """

    def __init__(self, backend: Backend, base: str):
        self.backend = backend
        self.base = base
        self._packs: dict[str, set[str]] = {}  # item -> packs listing it
        self._record_items: dict[str, tuple[str, ...]] = {}  # pack -> items, for records read from files
        self._pack_sizes: dict[str, int] = {}  # pack -> recorded size in bytes
        self._dropped: set[tuple[str, str]] = set()
        self._seen: dict[str, set[str]] = {RECORDS: set(), DROPS: set(), INDEX: set()}
        self._covered: set[str] = set()  # record names folded into a loaded index
        self._records: OrderedDict[str, Record] = OrderedDict()
        self.damaged: dict[str, Damage] = {}
        self.loaded = False
        self.lock = threading.RLock()  # one state object is shared by the threads of a process

    # ------------------------------------------------------------------ loading
    def refresh(self) -> "StageState":
        """Read the index, record and drop files not seen yet (one listing per folder)."""
        with self.lock:
            for _ in range(5):
                try:
                    self._refresh_once()
                    self.loaded = True
                    return self
                except FileNotFoundError:  # a compaction removed a file between listing and reading
                    continue
            self._refresh_once()
            self.loaded = True
            return self

    def _refresh_once(self) -> None:
        for name in sorted(self.backend.listdir(f"{self.base}/{INDEX}")):
            if name.endswith(".parquet") and name not in self._seen[INDEX] and not is_temporary(name):
                self._load_index(name)
        for name in self.backend.listdir(f"{self.base}/{DROPS}"):
            if name.endswith(".json") and name not in self._seen[DROPS] and not is_temporary(name):
                self._load_drop(name)
        listed = set()
        for name in self.backend.listdir(f"{self.base}/{RECORDS}"):
            if not name.endswith(".json") or is_temporary(name):
                continue
            listed.add(name)
            if name in self._seen[RECORDS]:
                continue
            if name in self._covered:
                self._seen[RECORDS].add(name)
                continue
            self._load_record(name)
        for name in self._seen[RECORDS] - listed - self._covered:  # removed since it was read: forget its items
            self._seen[RECORDS].discard(name)
            pack = name[: -len(".json")]
            for item in self._record_items.pop(pack, ()):
                self._packs.get(item, set()).discard(pack)
            self._records.pop(pack, None)

    def _load_index(self, name: str) -> None:
        path = f"{self.base}/{INDEX}/{name}"
        data = self.backend.get(path)  # I/O errors propagate: a file that cannot be fetched now is not damaged
        try:
            tbl = pq.read_table(io.BytesIO(data))
            meta = json.loads((tbl.schema.metadata or {}).get(b"ovseg", b"{}"))
            rows = tbl.select(["item", "pack", "dropped", "pack_size"]).to_pydict()
        except Exception as e:  # noqa: BLE001 - any parse error: the file is damaged, not the command
            self._damage(path, f"unreadable index ({type(e).__name__}: {e})")
            self._seen[INDEX].add(name)
            return
        for item, pack, dropped, size in zip(rows["item"], rows["pack"], rows["dropped"], rows["pack_size"]):
            if dropped:
                self._dropped.add((item, pack))
            else:
                self._packs.setdefault(item, set()).add(pack)
                self._pack_sizes[pack] = int(size)
        self._covered.update(meta.get("records", []))
        self._seen[DROPS].update(meta.get("drops", []))
        self._seen[INDEX].add(name)

    def _load_drop(self, name: str) -> None:
        path = f"{self.base}/{DROPS}/{name}"
        data = self.backend.get(path)
        try:
            pairs = [(str(i), str(p)) for i, p in json.loads(data)["drops"]]
        except Exception as e:  # noqa: BLE001
            self._damage(path, f"unreadable drop file ({type(e).__name__}: {e})")
            self._seen[DROPS].add(name)
            return
        self._dropped.update(pairs)
        self._seen[DROPS].add(name)

    def _load_record(self, name: str) -> None:
        path = f"{self.base}/{RECORDS}/{name}"
        data = self.backend.get(path)
        try:
            rec = Record.from_bytes(data)
        except Exception as e:  # noqa: BLE001
            self._damage(path, f"unreadable completion record ({type(e).__name__}: {e}); its items count as "
                               "incomplete and are recomputed")
            self._seen[RECORDS].add(name)
            return
        self.add_record(rec, name)

    def _damage(self, path: str, error: str) -> None:
        if path not in self.damaged:
            log.warning("%s: %s", path, error)
        self.damaged[path] = Damage(path, error)

    # ------------------------------------------------------------------ updates from this process
    def add_record(self, rec: Record, name: str | None = None) -> None:
        with self.lock:
            for item in rec.items:
                self._packs.setdefault(item, set()).add(rec.pack)
            self._record_items[rec.pack] = tuple(rec.items)
            self._pack_sizes[rec.pack] = rec.pack_size
            self._seen[RECORDS].add(name or f"{rec.pack}.json")
            self._remember(rec)

    def add_drops(self, pairs: Iterable[tuple[str, str]], name: str | None = None) -> None:
        with self.lock:
            self._dropped.update(pairs)
            if name:
                self._seen[DROPS].add(name)

    # ------------------------------------------------------------------ queries
    def pack_of(self, item: str) -> str | None:
        """The newest pack holding a valid copy of ``item``, or None."""
        with self.lock:
            valid = [p for p in self._packs.get(item, ()) if (item, p) not in self._dropped]
        return max(valid) if valid else None

    def complete(self) -> set[str]:
        """Items with a valid copy."""
        with self.lock:
            dropped = self._dropped
            return {i for i, packs in self._packs.items() if any((i, p) not in dropped for p in packs)}

    def valid_pairs(self) -> list[tuple[str, str]]:
        """(item, pack) of every complete item's current copy."""
        with self.lock:
            return [(i, p) for i in sorted(self._packs) if (p := self.pack_of(i)) is not None]

    def dropped_items(self) -> set[str]:
        """Items that were un-marked and have no valid copy now (they are recomputed by the next run)."""
        with self.lock:
            return {i for i, _ in self._dropped if self.pack_of(i) is None}

    def missing_packs(self, listed: Mapping[str, int]) -> dict[str, str]:
        """Packs in use that are absent from ``listed`` (pack -> size on disk) or of another size than recorded."""
        out = {}
        for pack in self.packs_in_use():
            size, recorded = listed.get(pack), self._pack_sizes.get(pack, -1)
            if size is None:
                out[pack] = "missing"
            elif recorded >= 0 and size != recorded:
                out[pack] = f"truncated or replaced ({size} of {recorded} bytes)"
        return out

    def items_in(self, packs: Iterable[str]) -> list[tuple[str, str]]:
        """(item, pack) pairs whose current copy is in one of ``packs``."""
        wanted = set(packs)
        return [(i, p) for i, p in self.valid_pairs() if p in wanted]

    def packs_in_use(self) -> set[str]:
        return {p for _, p in self.valid_pairs()}

    def known_packs(self) -> set[str]:
        with self.lock:
            return {p for packs in self._packs.values() for p in packs}

    def record(self, pack: str) -> Record:
        """The completion record of a pack (cached). Raises ``FileNotFoundError`` or ``ValueError``."""
        with self.lock:
            rec = self._records.get(pack)
            if rec is not None:
                self._records.move_to_end(pack)
                return rec
        rec = Record.from_bytes(self.backend.get(f"{self.base}/{RECORDS}/{pack}.json"))
        with self.lock:
            self._remember(rec)
        return rec

    def _remember(self, rec: Record) -> None:
        self._records[rec.pack] = rec
        while len(self._records) > _RECORD_CACHE:
            self._records.popitem(last=False)

    # ------------------------------------------------------------------ compaction
    def uncovered_records(self) -> int:
        return len(self._seen[RECORDS] - self._covered)

    def compact(self) -> str | None:
        """Fold every loaded record, drop and index file into one new index file.

        Records stay (they hold the offsets and checksums reads need); the old index files and
        drop files are deleted only after the new index is written, so a concurrent loader or
        compactor never loses a drop. Returns the new index name, or None if nothing to fold.
        """
        with self.lock:
            return self._compact()

    def _compact(self) -> str | None:
        self.refresh()
        old_index = sorted(self._seen[INDEX])
        drops = sorted(n for n in self._seen[DROPS])
        if len(old_index) <= 1 and not drops and self.uncovered_records() == 0:
            return None
        items, packs, dropped, sizes = [], [], [], []
        for item, ps in sorted(self._packs.items()):
            for p in sorted(ps):
                items.append(item)
                packs.append(p)
                dropped.append(False)
                sizes.append(self._pack_sizes.get(p, -1))
        for item, p in sorted(self._dropped):
            items.append(item)
            packs.append(p)
            dropped.append(True)
            sizes.append(-1)
        meta = {"records": sorted(self._seen[RECORDS]), "drops": drops, "folded_index": old_index}
        tbl = pa.table([items, packs, dropped, sizes], schema=_INDEX_SCHEMA).replace_schema_metadata(
            {"ovseg": json.dumps(meta)})
        buf = io.BytesIO()
        pq.write_table(tbl, buf)
        name = f"{new_id()}.parquet"
        self.backend.put_if_absent(f"{self.base}/{INDEX}/{name}", buf.getvalue())
        self._seen[INDEX].add(name)
        self._covered.update(self._seen[RECORDS])
        for old in old_index:
            self.backend.delete(f"{self.base}/{INDEX}/{old}")
            self._seen[INDEX].discard(old)
        for d in drops:
            self.backend.delete(f"{self.base}/{DROPS}/{d}")
        return name


def write_drops(backend: Backend, base: str, pairs: list[tuple[str, str]], reason: str) -> str:
    """Write a drop file un-marking ``(item, pack)`` pairs; returns its name."""
    name = f"{new_id()}.json"
    data = json.dumps({"format": RECORD_FORMAT, "created": time.time(), "reason": reason,
                       "drops": [list(p) for p in pairs]}).encode()
    backend.put_if_absent(f"{base}/{DROPS}/{name}", data)
    return name
