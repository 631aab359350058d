"""The store's read path: an item's arrays, checked against its completion record.

``StoreReader`` is the reading half of ``storage.store.Store`` (which mixes it in): every read
goes through the item's completion record (its pack, member offsets, sizes and CRC-32), so
damaged bytes are never returned as data; a damaged item is un-marked (the next run recomputes
it) and raises ``DamagedOutputError``. It uses the store's ``state``, ``stage_dir``,
``drop_items``, ``backend`` and ``location``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from storage.packs import ItemEntry, PackDamagedError, decode_arrays, verify_members
from storage.records import PACKS, RECORDS, Record, StageState

log = logging.getLogger("ovseg.storage")


class MissingOutputError(KeyError):
    """A requested stage output is not complete in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedOutputError(MissingOutputError):
    """A stored output does not match its completion record; it was un-marked and will be recomputed."""


def metadata_members(entry: ItemEntry, names: Iterable[str], whole: bool) -> list:
    """The Zarr metadata members (``zarr.json``) of the arrays ``names`` of an item, and of its group when
    the ``whole`` item is read: each array's sits right before its chunk, so checking them costs a few
    hundred bytes per read, and a read never returns an item whose pack a Zarr reader would see altered."""
    wanted = {f"{entry.item}/{n}/zarr.json" for n in names} | ({f"{entry.item}/zarr.json"} if whole else set())
    return [m for m in entry.members if m.name in wanted]


class StoreReader:
    """The read path of ``Store`` (mixed into it; see the module docstring)."""

    def _entry(self, stage: str, key: str, item: str, stale: str | None = None
               ) -> tuple[StageState, str, Record, ItemEntry]:
        """The item's current pack, record and entry. ``stale``: a pack found gone, re-listed once."""
        st = self.state(stage, key, refresh=stale is not None)
        pack = st.pack_of(item) or (None if stale is not None else self.state(stage, key).pack_of(item))
        where = f"{stage}/{key}/{item}"
        if pack is None:
            raise MissingOutputError(f"{where} is not complete in {self.location}; run the stage first "
                                     f"(ovseg run / ovseg stage {stage})")
        try:
            rec = st.record(pack)
            return st, pack, rec, rec.items[item]
        except (FileNotFoundError, ValueError, KeyError) as e:
            if stale is None:  # this process's view may be old (e.g. a superseded pack removed by gc)
                return self._entry(stage, key, item, stale=pack)
            raise self._damaged(stage, key, item, pack, f"completion record {RECORDS}/{pack}.json is missing or "
                                                        f"unreadable ({type(e).__name__}: {e})") from e

    def read_item(self, stage: str, key: str, item: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read a complete item's arrays (all, or ``names``), checked against its record.

        Raises:
            MissingOutputError: the item is not complete (or lacks an array).
            DamagedOutputError: the stored bytes do not match the record; the item is un-marked.
        """
        return self._read(stage, key, item, names, retried=False)

    def _read(self, stage: str, key: str, item: str, names: Iterable[str] | None, retried: bool) -> dict[str, np.ndarray]:
        st, pack, rec, entry = self._entry(stage, key, item)
        where = f"{stage}/{key}/{item}"
        wanted = list(entry.arrays) if names is None else list(names)
        missing = [n for n in wanted if n not in entry.arrays]
        if missing:
            raise MissingOutputError(f"{where} has no array {missing[0]!r} (has {sorted(entry.arrays)})")
        meta = metadata_members(entry, wanted, whole=names is None)
        members = [m for m in entry.members if m.name in {entry.arrays[n].chunk for n in wanted}] + meta
        if not members:
            return decode_arrays(b"", 0, entry, wanted, where)
        lo, hi = min(m.offset for m in members), max(m.offset + m.size for m in members)
        path = f"{self.stage_dir(stage, key)}/{PACKS}/{pack}.zip"
        try:
            data = self.backend.get_range(path, lo, hi)
            verify_members(data, lo, meta, f"{path} ({item})")  # Zarr readers of the pack read these
            return decode_arrays(data, lo, entry, wanted, f"{path} ({item})")
        except FileNotFoundError as e:
            if not retried and self.state(stage, key).pack_of(item) != pack:  # recomputed elsewhere meanwhile
                return self._read(stage, key, item, names, retried=True)
            raise self._damaged(stage, key, item, pack, f"pack {path} is missing") from e
        except (PackDamagedError, ValueError, RuntimeError) as e:
            raise self._damaged(stage, key, item, pack, str(e)) from e

    def read_items(self, stage: str, key: str, items: Iterable[str], names: Iterable[str] | None = None
                   ) -> dict[str, dict[str, np.ndarray] | Exception]:
        """Read many items, one ranged request per pack; a failed item maps to its exception."""
        st = self.state(stage, key, refresh=False)
        by_pack: dict[str | None, list[str]] = {}
        for item in items:
            by_pack.setdefault(st.pack_of(item), []).append(item)
        out: dict[str, dict[str, np.ndarray] | Exception] = {}
        for pack, group in by_pack.items():
            try:
                rec = st.record(pack) if pack is not None else None
                entries = [rec.items[i] for i in group] if rec is not None else []
            except (FileNotFoundError, ValueError, KeyError):
                entries = []
            if len(entries) > 1:
                wanted = {i: list(e.arrays) if names is None else list(names) for i, e in zip(group, entries)}
                metas = {i: metadata_members(e, [n for n in wanted[i] if n in e.arrays], whole=names is None)
                         for i, e in zip(group, entries)}
                chunks = [m for i, e in zip(group, entries) for m in e.members
                          if m.name in {e.arrays[n].chunk for n in wanted[i] if n in e.arrays}]
                chunks += [m for ms in metas.values() for m in ms]
                if chunks:
                    lo, hi = min(m.offset for m in chunks), max(m.offset + m.size for m in chunks)
                    path = f"{self.stage_dir(stage, key)}/{PACKS}/{pack}.zip"
                    try:
                        data = self.backend.get_range(path, lo, hi)
                    except FileNotFoundError:
                        data = None
                    if data is not None:
                        for i, e in zip(group, entries):
                            try:
                                verify_members(data, lo, metas[i], f"{path} ({i})")
                                out[i] = decode_arrays(data, lo, e, wanted[i], f"{path} ({i})")
                            except (PackDamagedError, KeyError, ValueError):
                                pass  # read alone below: the error path un-marks it
            for i in group:
                if i not in out:
                    try:
                        out[i] = self.read_item(stage, key, i, names)
                    except MissingOutputError as e:
                        out[i] = e
        return out

    def verify_item(self, stage: str, key: str, item: str, checksums: bool = True) -> None:
        """Check every member of an item (presence, size, CRC-32); raises ``DamagedOutputError``."""
        _, pack, rec, entry = self._entry(stage, key, item)
        path = f"{self.stage_dir(stage, key)}/{PACKS}/{pack}.zip"
        lo, hi = entry.span
        size = self.backend.size(path)
        if size is None:
            raise self._damaged(stage, key, item, pack, f"pack {path} is missing", drop=False)
        if size < rec.pack_size or hi > size:
            raise self._damaged(stage, key, item, pack, f"pack {path} is truncated ({size} of {rec.pack_size} bytes)",
                                drop=False)
        if checksums:
            try:
                verify_members(self.backend.get_range(path, lo, hi), lo, entry.members, f"{path} ({item})")
            except PackDamagedError as e:
                raise self._damaged(stage, key, item, pack, str(e), drop=False) from e

    def _damaged(self, stage: str, key: str, item: str, pack: str, why: str, drop: bool = True) -> "DamagedOutputError":
        """Un-mark a damaged item (unless ``drop`` is False) and return the error to raise."""
        if drop:
            try:
                self.drop_items(stage, key, [item], reason=f"damaged: {why}", pairs=[(item, pack)])
            except OSError as e:
                log.warning("cannot un-mark damaged %s/%s/%s: %s", stage, key, item, e)
        return DamagedOutputError(f"{stage}/{key}/{item} is damaged: {why}; "
                                  + ("it was un-marked and the next run recomputes it" if drop else
                                     "`ovseg cache verify --repair` un-marks it so the next run recomputes it"))

    def item_attrs(self, stage: str, key: str, item: str) -> dict[str, Any]:
        """The attrs of a complete item (with its pack's record metadata under ``record``)."""
        _, _, rec, entry = self._entry(stage, key, item)
        return {**dict(entry.attrs), "record": dict(rec.meta)}
