"""Writing a pack: many items of one stage output set in one file, then its completion record."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.fstemp import StoreTemporary
from storage.keys import StageKey, to_jsonable
from storage.packs import ItemEntry, PackWriter
from storage.paths import check_name
from storage.records import PACKS, RECORDS, Record, new_id

if TYPE_CHECKING:
    from storage.store import Store


class PackSession:
    """One pack being written by one process: ``add`` items, then ``commit`` (or use ``with``).

    The pack is written to a temporary file (``storage.fstemp.StoreTemporary``) and moved into
    place whole; its record is created after it. Until then nothing of it is visible as complete;
    a full disk raises ``StoreWriteError`` and removes the temporary file, a crash leaves one that
    ``cache gc`` removes.
    """

    def __init__(self, store: Store, stage_key: StageKey, meta: dict[str, Any]):
        self.store = store
        self.stage_key = stage_key
        self.meta = to_jsonable(meta)
        self.pack_id = new_id()
        base = store.stage_dir(stage_key.stage, stage_key.key)
        self.path = f"{base}/{PACKS}/{self.pack_id}.zip"
        self.record_path = f"{base}/{RECORDS}/{self.pack_id}.json"
        self._file = StoreTemporary(store.backend, self.path)  # a full disk: StoreWriteError, no temporary left
        self._writer = PackWriter(self._file, {"stage": stage_key.stage, "key": stage_key.key, "pack": self.pack_id})
        self.entries: dict[str, ItemEntry] = {}

    def add(self, item: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
        check_name("item", item)
        for name in arrays:
            check_name("array", name)
        self.entries[item] = self._writer.add(item, arrays, to_jsonable(dict(attrs)))

    def commit(self) -> list[str]:
        """Move the pack into place, then write its record; returns the committed items."""
        if not self.entries:
            self.abort()
            return []
        try:
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        size = self._file.commit()
        rec = Record(self.pack_id, size, time.time(), dict(self.entries), self.meta)
        try:
            self.store.backend.put_if_absent(self.record_path, rec.to_bytes())
        except BaseException:  # no record (disk full ...): the pack is not left behind without one
            with contextlib.suppress(OSError):
                self.store.backend.delete(self.path)
            raise
        self.store.state(self.stage_key.stage, self.stage_key.key, refresh=False).add_record(rec)
        return list(self.entries)

    def abort(self) -> None:
        self._writer.abandon()
        self._file.discard()

    def __enter__(self) -> "PackSession":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
