"""Listing, verification and garbage collection of a store (``ovseg cache ls / verify / gc``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.fsio import Backend, Entry, is_temporary
from storage.journal import JOURNAL
from storage.keys import StageKey
from storage.leases import LEASES
from storage.paths import TABLES
from storage.reading import DamagedOutputError, MissingOutputError
from storage.records import DROPS, INDEX, PACKS, RECORDS
from storage.bank_rows import listed_segments, segment_files, segment_folders, verify_segments
from storage.row_files import ROWS, verify_row_file

if TYPE_CHECKING:  # the store calls none of this module: a type only
    from storage.store import Store

log = logging.getLogger("ovseg.storage")


@dataclass(frozen=True)
class StageInfo:
    """One stage output set as listed by ``list_stages``."""

    stage: str
    key: str
    attrs: dict[str, Any]
    complete: int
    dropped: int
    nbytes: int
    damaged_files: tuple[str, ...] = ()
    last_used: float = 0.0  # seconds since the epoch: the last run that used it (or its creation)

    @property
    def random_weights(self) -> bool:
        if "random_weights" in self.attrs:
            return bool(self.attrs["random_weights"])
        w = self.attrs.get("stage_key", {}).get("weights")
        return StageKey("x", weights=w if isinstance(w, dict) else None).is_random_weights


def list_stages(store: Store, with_bytes: bool = True) -> list[StageInfo]:
    """Every ``(stage, key)`` in the store with its attrs, item counts, bytes and unreadable files."""
    out = []
    for stage, key in store.stage_sets():
        st = store.state(stage, key)
        attrs = store.stage_attrs(stage, key)
        damaged = tuple(sorted(st.damaged)) + ((attrs["damaged"],) if "damaged" in attrs else ())
        nbytes = sum(s for _, s in store.backend.walk_files(store.stage_dir(stage, key))) if with_bytes else 0
        out.append(StageInfo(stage, key, attrs, len(st.complete()), len(st.dropped_items()), nbytes, damaged,
                             store.last_used(stage, key)))
    return out


# ----------------------------------------------------------------------------- verify
@dataclass
class SetReport:
    """Verification of one stage output set."""

    stage: str
    key: str
    checked: int = 0
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (item, why)
    damaged_files: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    repaired: int = 0

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.damaged_files


def verify(store: Store, sets: Iterable[tuple[str, str]] | None = None, checksums: bool = True,
           repair: bool = False) -> list[SetReport]:
    """Check every complete item of the given (default: all) stage output sets.

    Presence and sizes of the packs always, CRC-32 of every member with ``checksums``; also
    unreadable completion records, index, drop files and ``stage.json``. With ``repair``,
    damaged items are un-marked (the next run recomputes exactly those) and unreadable records
    are removed with their packs.
    """
    reports = []
    for stage, key in (sorted(sets) if sets is not None else store.stage_sets()):
        rep = SetReport(stage, key)
        st = store.state(stage, key)
        attrs = store.stage_attrs(stage, key)
        if "damaged" in attrs:
            rep.damaged_files.append((f"{store.stage_dir(stage, key)}/stage.json", attrs["damaged"]))
        rep.damaged_files.extend((d.path, d.error) for d in st.damaged.values())
        for item, pack in st.valid_pairs():
            rep.checked += 1
            try:
                store.verify_item(stage, key, item, checksums=checksums)
                if stage == "bank_values" and item == ROWS and checksums:
                    verify_row_file(store, stage, key)  # an imported value store's rows (storage.row_files)
                if stage == "bank_index":  # a built bank's values in region-id order (storage.bank_rows)
                    verify_segments(store, store.item_attrs(stage, key, item), remove=repair, checksums=checksums)
            except (DamagedOutputError, MissingOutputError) as e:
                rep.damaged.append((item, str(e)))
        if repair:
            bad = [i for i, _ in rep.damaged]
            rep.repaired = store.drop_items(stage, key, bad, reason="cache verify --repair")
            rep.repaired += len(store.remove_damaged_records(stage, key))
            for path, _ in rep.damaged_files:
                if f"/{INDEX}/" in path or f"/{DROPS}/" in path:
                    store.backend.delete(path)  # its content is rebuilt from the records by the next compaction
                    rep.repaired += 1
        reports.append(rep)
    return reports


# ----------------------------------------------------------------------------- gc
@dataclass
class GcReport:
    """What ``gc`` removed (or would remove with ``dry_run``)."""

    sets: list[tuple[str, str, int, int]] = field(default_factory=list)  # (stage, key, items, bytes)
    packs: int = 0
    items: int = 0
    temporaries: int = 0
    leases: int = 0
    segments: int = 0  # bank value row segments no complete index lists (``storage.bank_rows``)
    segment_folders: list[tuple[str, str, str, int, int]] = field(default_factory=list)  # (stage, key, folder, n, bytes)
    nbytes: int = 0
    paths: list[str] = field(default_factory=list)
    remaining: int = 0  # ``evict``: bytes of the stage outputs left (or that would be left)


def gc(store: Store, keep: Iterable[tuple[str, str]], dry_run: bool = False, stale_after: float | None = None
       ) -> GcReport:
    """Delete stage output sets not in ``keep``; in kept sets, packs no item uses any more and
    packs whose writer died before recording them, and bank value row segments no kept complete
    index lists (``_gc_segments``); temporary files and leases of dead writers.

    ``stale_after`` (default: the lease TTL) is how old a temporary file or an unrecorded pack
    must be before it counts as abandoned.
    """
    keep_set = set(keep)
    age = store.leases.ttl if stale_after is None else stale_after
    rep = GcReport()

    def remove(path: str, size: int) -> None:
        rep.paths.append(path)
        rep.nbytes += size
        if not dry_run:
            store.backend.delete(path)

    for stage, key in store.stage_sets():
        base = store.stage_dir(stage, key)
        if (stage, key) not in keep_set:
            files = list(store.backend.walk_files(base))
            n = len(store.state(stage, key).complete())
            rep.sets.append((stage, key, n, sum(s for _, s in files)))
            rep.items += n
            rep.nbytes += sum(s for _, s in files)
            rep.paths.append(base)
            if not dry_run:
                store.backend.delete_tree(base)
                store.backend.delete_tree(store.backend.path(LEASES, stage, key))
            continue
        _gc_set(store, stage, key, age, rep, remove, dry_run)
    _gc_segments(store, keep_set, age, rep, remove)
    for folder in _temp_folders(store):
        for e in stale_temporaries(store.backend, folder, age):
            rep.temporaries += 1
            remove(f"{folder}/{e.name}", e.size)
    now = time.time()
    for stage in store.backend.subfolders(store.backend.path(LEASES)):
        for key in store.backend.subfolders(store.backend.path(LEASES, stage)):
            for info in store.leases.leases(stage, key):
                if not info.alive(now):
                    rep.leases += 1
                    remove(store.backend.path(LEASES, stage, key, f"{info.lease_id}.json"), 0)
    return rep


def evict(store: Store, protect: Iterable[tuple[str, str]], max_bytes: int | None = None,
          older_than: float | None = None, dry_run: bool = False) -> GcReport:
    """The storage budget: delete whole output sets, least recently used first, never one in ``protect``.

    ``max_bytes``: evict until the stage outputs total at most this many bytes. ``older_than``
    (seconds): evict every set not used for that long. Both may be given. Returns what was (or
    would be) freed.
    """
    keep = set(protect)
    now = time.time()
    infos = sorted(list_stages(store, with_bytes=True), key=lambda i: (i.last_used, i.stage, i.key))
    total = sum(i.nbytes for i in infos)
    rep = GcReport()
    for info in infos:
        if (info.stage, info.key) in keep:
            continue
        too_old = older_than is not None and now - info.last_used > older_than
        over = max_bytes is not None and total > max_bytes
        if not (too_old or over):
            continue
        base = store.stage_dir(info.stage, info.key)
        rep.sets.append((info.stage, info.key, info.complete, info.nbytes))
        rep.items += info.complete
        rep.nbytes += info.nbytes
        rep.paths.append(base)
        total -= info.nbytes
        if not dry_run:
            store.backend.delete_tree(base)
            store.backend.delete_tree(store.backend.path(LEASES, info.stage, info.key))
    rep.remaining = total
    return rep


def _gc_set(store: Store, stage: str, key: str, age: float, rep: GcReport, remove, dry_run: bool) -> None:
    base = store.stage_dir(stage, key)
    st = store.state(stage, key)
    in_use = st.packs_in_use()
    known = st.known_packs()
    records = {n[: -len(".json")] for n in store.backend.listdir(f"{base}/{RECORDS}") if n.endswith(".json")}
    now = time.time()
    for e in store.backend.list_entries(f"{base}/{PACKS}"):
        if is_temporary(e.name) or not e.name.endswith(".zip"):
            continue
        pack = e.name[: -len(".zip")]
        if pack in in_use:
            continue
        if pack in known:  # every item of it was recomputed elsewhere or un-marked
            try:
                rec = st.record(pack)
            except (FileNotFoundError, ValueError):
                rec = None
            if rec is not None and not dry_run:
                pairs = [(i, pack) for i in rec.items]
                store.drop_items(stage, key, [], reason="cache gc: pack removed", pairs=pairs)
            rep.packs += 1
            remove(f"{base}/{PACKS}/{e.name}", e.size)
            if pack in records:
                remove(f"{base}/{RECORDS}/{pack}.json", 0)
        elif pack not in records and now - e.mtime > age:  # its writer died before writing the record
            rep.packs += 1
            remove(f"{base}/{PACKS}/{e.name}", e.size)
    if not dry_run and st.uncovered_records() + len(store.backend.listdir(f"{base}/{DROPS}")) > 0:
        st.compact()


def _gc_segments(store: Store, keep: set[tuple[str, str]], age: float, rep: GcReport, remove) -> None:
    """Bank value row segments (``storage.bank_rows``) of the kept ``bank_values`` sets that no complete item of a
    kept ``bank_index`` set lists (a bank rebuilt under another region source, an index gc'd or evicted), once
    older than ``age``. Never those of a values set a live ``bank_index`` lease reads (an index being built
    reuses the segments in place before its item lists them); when an index item or a live index's
    ``stage.json`` cannot be read, none (what it lists is unknown)."""
    listed: set[str] = set()
    kept = [s for s in store.stage_sets() if s in keep]
    for stage, key in kept:
        if stage == "bank_index":
            for item in store.complete_items(stage, key):
                try:
                    listed |= listed_segments(store, store.item_attrs(stage, key, item))
                except (MissingOutputError, OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("cache gc: keeps every bank value row segment: %s/%s/%s is unreadable (%s)",
                                stage, key, item, e)
                    return
    busy: set[str] = set()
    now = time.time()
    for key in store.backend.subfolders(store.backend.path(LEASES, "bank_index")):
        if any(info.alive(now) for info in store.leases.leases("bank_index", key)):
            upstream = store.stage_attrs("bank_index", key).get("stage_key", {}).get("upstream")
            if not isinstance(upstream, dict):
                log.info("cache gc: keeps every bank value row segment: bank_index/%s is being built", key)
                return
            busy.update(upstream.values())
    for stage, key in sorted(kept):
        if stage != "bank_values" or key in busy:
            continue
        found: dict[str, list[Entry]] = {}
        for folder, e in segment_files(store, stage, key):
            if f"{folder}/{e.name}" not in listed and now - e.mtime > age:
                found.setdefault(folder, []).append(e)
        base = store.stage_dir(stage, key)
        for folder, entries in sorted(found.items()):
            rep.segments += len(entries)
            rep.segment_folders.append((stage, key, folder[len(base) + 1:], len(entries), sum(e.size for e in entries)))
            for e in entries:
                remove(f"{folder}/{e.name}", e.size)


def clear_dead_writes(store: Store, stage: str, key: str) -> int:
    """What killed writers of an output set left, at once (``cache gc`` waits the lease TTL): the temporaries in
    its ``packs``, ``records`` and ``rows`` folders (a row file's: up to a whole value store) and its packs without
    a record. Only for a caller holding a lease on every item the set's writers write (``ovseg bank import``: the
    set's one item), so no live writer is between a temporary and its record. Returns the bytes removed."""
    base, backend = store.stage_dir(stage, key), store.backend
    records = {n[: -len(".json")] for n in backend.listdir(f"{base}/{RECORDS}") if n.endswith(".json")}
    known = store.state(stage, key).known_packs() | records
    removed = 0
    for folder in (f"{base}/{PACKS}", f"{base}/{RECORDS}", f"{base}/{ROWS}"):
        for e in backend.list_entries(folder):
            unrecorded = folder.endswith(PACKS) and e.name.endswith(".zip") and e.name[: -len(".zip")] not in known
            if is_temporary(e.name) or unrecorded:
                log.info("removing %s/%s (left by a killed writer)", folder, e.name)
                backend.delete(f"{folder}/{e.name}")
                removed += e.size
    return removed


def _temp_folders(store: Store) -> list[str]:
    b = store.backend
    if not b.is_local:  # object stores: packs are uploaded whole from a local temporary file, nothing is left
        return []
    out = [b.path(), b.path(JOURNAL)]
    for table in b.subfolders(b.path(TABLES)):
        out.append(b.path(TABLES, table))
    for stage, key in store.stage_sets():
        base = store.stage_dir(stage, key)
        out += [base, f"{base}/{PACKS}", f"{base}/{RECORDS}", f"{base}/{DROPS}", f"{base}/{INDEX}", f"{base}/{ROWS}"]
        out += segment_folders(store, stage, key)
    for stage in b.subfolders(b.path(LEASES)):
        out += [b.path(LEASES, stage, key) for key in b.subfolders(b.path(LEASES, stage))]
    return out


def stale_temporaries(backend: Backend, folder: str, older_than: float) -> list[Entry]:
    """Temporary files in ``folder`` not modified for ``older_than`` seconds (their writer is gone).

    Object stores hold none (uploads are whole), so nothing is listed there."""
    if not backend.is_local:
        return []
    now = time.time()
    return [e for e in backend.list_entries(folder) if is_temporary(e.name) and now - e.mtime > older_than]
