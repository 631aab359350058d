"""The stage store: the source of truth for what is done, on a local folder or an fsspec URL.

Layout (paths relative to the store root)::

    ovseg-store.json                              store format marker
    stages/<stage>/<key>/stage.json               the StageKey payload (params, upstream keys, code version,
                                                  weights identity) and whether random weights are involved
    stages/<stage>/<key>/packs/<pack>.zip         the outputs of one batch of items: a Zarr v3 hierarchy in a ZIP
    stages/<stage>/<key>/records/<pack>.json      the pack's completion record (per item: arrays, members,
                                                  sizes, CRC-32), written LAST
    stages/<stage>/<key>/drops/<id>.json          un-marked items (damaged, forced, repaired)
    stages/<stage>/<key>/index/<id>.parquet       compacted item -> pack index
    leases/<stage>/<key>/<lease>.json             who computes which items now (heartbeat, TTL)
    journal/<run_id>.json                         run journals (status, heartbeat, whole plan, progress)
    tables/<table>/<name>.parquet                 manifests, run records, failures, metrics

Guarantees (each tested, see README "Overnight runs"): an item is complete only when its record
is in place; every read checks the recorded sizes and checksums and never returns damaged bytes
as data (a damaged item is un-marked, so the next run recomputes it); writers never share a
file; stage registration is a create-if-absent of one file, safe under any concurrency.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from storage.fsio import Backend, s3_error
from storage.journal import RunEntry, RunJournal, read_journals
from storage.keys import StageKey
from storage.leases import DEFAULT_TTL, LeaseManager
from storage.packs import ItemEntry, PackDamagedError, decode_arrays, verify_members
from storage.records import PACKS, RECORDS, Record, StageState, write_drops

if TYPE_CHECKING:
    from storage.writing import PackSession

log = logging.getLogger("ovseg.storage")

DEFAULT_STORE = "ovseg-store"
STAGES = "stages"
TABLES = "tables"
MARKER = "ovseg-store.json"
STORE_FORMAT = 2


class StoreError(RuntimeError):
    """A store operation failed; the message names the store location and the item."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A read-only command was pointed at a store that does not exist."""


class MissingOutputError(KeyError):
    """A requested stage output is not complete in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DamagedOutputError(MissingOutputError):
    """A stored output does not match its completion record; it was un-marked and will be recomputed."""


def resolve_location(location: str | os.PathLike | None = None) -> str:
    """The store location: the argument, else ``$OVSEG_STORE``, else ``./ovseg-store``."""
    if location is None or str(location) == "":
        location = os.environ.get("OVSEG_STORE") or DEFAULT_STORE
    loc = str(location)
    if "://" in loc and not loc.startswith("file://"):
        return loc
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    return str(Path(loc).expanduser().resolve())


def check_name(kind: str, name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name in ("zarr.json", "stage.json"):
        raise ValueError(f"invalid {kind} name {name!r}: must be non-empty, without '/', not starting with '.'")
    return name


class Store:
    """A stage store.

    Args:
        location: local directory or fsspec URL; default ``$OVSEG_STORE`` or ``./ovseg-store``.
        storage_options: fsspec options for remote stores.
        create: create the store if it does not exist (False: raise ``StoreNotFoundError``).
        lease_ttl: seconds without heartbeat after which another process's lease is dead.
    """

    def __init__(self, location: str | os.PathLike | None = None, storage_options: Mapping[str, Any] | None = None,
                 create: bool = True, lease_ttl: float = DEFAULT_TTL):
        self.location = resolve_location(location)
        self.backend = Backend(self.location, dict(storage_options or {}))
        self.fs, self.root, self.is_local = self.backend.fs, self.backend.root, self.backend.is_local
        self._states: dict[tuple[str, str], StageState] = {}
        self._registered: set[tuple[str, str]] = set()
        self._fresh: set[tuple[str, str]] = set()
        self._open(create)
        self.leases = LeaseManager(self.backend, lease_ttl)

    def _open(self, create: bool) -> None:
        marker = self.backend.path(MARKER)
        try:
            info = json.loads(self.backend.get(marker))
        except FileNotFoundError as e:
            if self.backend.is_s3 and s3_error(e)[0] == "NoSuchBucket":
                kind = StoreError if create else StoreNotFoundError
                raise kind(f"no ovseg store at {self.location}: its bucket does not exist; create the bucket first "
                           "(ovseg creates stores, not buckets) or check --store / OVSEG_STORE") from e
            info = None
        except (ValueError, OSError) as e:
            if isinstance(e, OSError) and not self.backend.is_local:  # endpoint, credentials or network
                raise StoreError(f"cannot open the store {self.location}: {type(e).__name__}: {e}; check the "
                                 "endpoint and credentials (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, FSSPEC_S3: docs/object-stores.md)") from e
            log.warning("%s is unreadable (%s); rewriting it", marker, e)
            self.backend.put_atomic(marker, json.dumps({"format": STORE_FORMAT, "created": time.time()}).encode())
            return
        if info is not None:
            if int(info.get("format", 0)) != STORE_FORMAT:
                raise StoreError(f"{self.location} is an ovseg store of format {info.get('format')}, this ovseg reads "
                                 f"format {STORE_FORMAT}; use another --store")
            return
        if self.backend.exists(self.backend.path("zarr.json")) and self.backend.exists(self.backend.path(STAGES)):
            raise StoreError(f"{self.location} was written by an earlier ovseg (one Zarr group per image, store "
                             f"format 1); point --store / OVSEG_STORE at a new folder (its outputs are recomputed)")
        if not create:
            raise StoreNotFoundError(f"no ovseg store at {self.location}; check --store / OVSEG_STORE "
                                     "(`ovseg run` creates one)")
        self.backend.mkdirs(self.backend.root)
        # on an object store, a prefix holding other files is allowed: the marker claims it
        self.backend.put_if_absent(marker, json.dumps({"format": STORE_FORMAT, "created": time.time()}).encode())

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # ----------------------------------------------------------------- paths
    def stage_dir(self, stage: str, key: str) -> str:
        return self.backend.path(STAGES, check_name("stage", stage), check_name("key", key))

    # ----------------------------------------------------------------- stages
    def register_stage(self, stage_key: StageKey, random_weights: bool | None = None) -> None:
        """Record the stage's key payload once (create-if-absent: safe when many processes race)."""
        ident = (stage_key.stage, stage_key.key)
        if ident in self._registered:
            return
        path = f"{self.stage_dir(*ident)}/stage.json"
        payload = {"stage_key": stage_key.payload(), "created": time.time(),
                   "random_weights": bool(stage_key.is_random_weights if random_weights is None else random_weights)}
        data = json.dumps(payload, sort_keys=True).encode()
        if not self.backend.put_if_absent(path, data) and "damaged" in self.stage_attrs(*ident):
            self.backend.put_atomic(path, data)  # rebuilt from the plan
            log.warning("rewrote the damaged %s", path)
        self._registered.add(ident)

    def touch(self, stage: str, key: str, run_id: str = "") -> None:
        """Record that a run used this stage output set now (``last-used.json``; ``cache gc --max-bytes`` evicts
        the least recently used sets first)."""
        path = f"{self.stage_dir(stage, key)}/last-used.json"
        try:
            self.backend.put_atomic(path, json.dumps({"time": time.time(), "run_id": run_id}).encode())
        except OSError as e:  # bookkeeping only: never fails a run
            log.warning("cannot record the use of %s/%s: %s", stage, key, e)

    def last_used(self, stage: str, key: str) -> float:
        """When a run last used the set (its creation time if never recorded; 0 if unknown)."""
        try:
            return float(json.loads(self.backend.get(f"{self.stage_dir(stage, key)}/last-used.json"))["time"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return float(self.stage_attrs(stage, key).get("created", 0) or 0)

    def stage_attrs(self, stage: str, key: str) -> dict[str, Any]:
        """The stage's ``stage.json``; ``{}`` if absent, ``{"damaged": message}`` if unreadable."""
        path = f"{self.stage_dir(stage, key)}/stage.json"
        try:
            data = self.backend.get(path)
        except FileNotFoundError:
            return {}
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or "stage_key" not in d:
                raise ValueError("no stage_key")
            return d
        except Exception as e:  # noqa: BLE001
            return {"damaged": f"{path} is unreadable ({type(e).__name__}: {e}); rerun an experiment that uses "
                               "this stage to rewrite it"}

    def stage_sets(self) -> list[tuple[str, str]]:
        """Every ``(stage, key)`` folder in the store."""
        base = self.backend.path(STAGES)
        return [(s, k) for s in self.backend.subfolders(base) for k in self.backend.subfolders(f"{base}/{s}")]

    def list_stages(self, with_bytes: bool = True):
        """Every stage output set with counts and bytes (``storage.maintenance.list_stages``)."""
        from storage.maintenance import list_stages

        return list_stages(self, with_bytes)

    # ----------------------------------------------------------------- completion
    def state(self, stage: str, key: str, refresh: bool = True) -> StageState:
        """The completion state of ``(stage, key)``, cached per process; ``refresh`` reads what is new."""
        ident = (stage, key)
        st = self._states.get(ident)
        if st is None:
            st = self._states[ident] = StageState(self.backend, self.stage_dir(stage, key))
            return st.refresh()
        return st.refresh() if refresh or not st.loaded else st

    def forget_fresh(self) -> None:
        """Start of a run: every view must be listed again before it is trusted."""
        self._fresh.clear()

    def mark_fresh(self, stage: str, key: str) -> None:
        """Note that this process's view of ``(stage, key)`` is current (the flow, right after a stage ran)."""
        self._fresh.add((stage, key))

    def state_is_fresh(self, stage: str, key: str) -> bool:
        return (stage, key) in self._fresh

    def complete_items(self, stage: str, key: str) -> set[str]:
        return self.state(stage, key).complete()

    def is_complete(self, stage: str, key: str, item: str) -> bool:
        st = self.state(stage, key, refresh=False)
        return st.pack_of(item) is not None or self.state(stage, key).pack_of(item) is not None

    def check_presence(self, stage: str, key: str) -> list[tuple[str, str]]:
        """Un-mark the items whose pack is missing or has another size than recorded (one listing).

        Returns ``(item, why)`` of the items un-marked. Bit-level damage is found on read or by
        ``cache verify`` (checksums); this cheap check runs before every stage of a run.
        """
        st = self.state(stage, key)
        listed = {e.name[: -len(".zip")]: e.size for e in self.backend.list_entries(f"{self.stage_dir(stage, key)}/{PACKS}")
                  if e.name.endswith(".zip")}
        bad = st.missing_packs(listed)
        if not bad:
            return []
        pairs = st.items_in(bad)
        self.drop_items(stage, key, [], reason="pack missing or truncated", pairs=pairs)
        return [(i, f"pack {p}.zip is {bad[p]}") for i, p in pairs]

    def missing(self, stage: str, key: str, items: Iterable[str]) -> list[str]:
        done = self.complete_items(stage, key)
        return [i for i in items if i not in done]

    # ----------------------------------------------------------------- writing
    def open_pack(self, stage_key: StageKey, meta: Mapping[str, Any] | None = None) -> "PackSession":
        """Start a pack for a batch of items of ``stage_key`` (registers the stage)."""
        from storage import writing

        self.register_stage(stage_key)
        return writing.PackSession(self, stage_key, dict(meta or {}))

    def write_item(self, stage_key: StageKey, item: str, arrays: Mapping[str, np.ndarray],
                   attrs: Mapping[str, Any] | None = None) -> None:
        """Write one item as its own pack (batches use ``open_pack``)."""
        with self.open_pack(stage_key) as pack:
            pack.add(item, arrays, attrs or {})

    # ----------------------------------------------------------------- reading
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
        members = [m for m in entry.members if m.name in {entry.arrays[n].chunk for n in wanted}]
        if not members:
            return decode_arrays(b"", 0, entry, wanted, where)
        lo, hi = min(m.offset for m in members), max(m.offset + m.size for m in members)
        path = f"{self.stage_dir(stage, key)}/{PACKS}/{pack}.zip"
        try:
            data = self.backend.get_range(path, lo, hi)
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
                chunks = [m for i, e in zip(group, entries) for m in e.members
                          if m.name in {e.arrays[n].chunk for n in wanted[i] if n in e.arrays}]
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

    def drop_items(self, stage: str, key: str, items: Iterable[str], reason: str,
                   pairs: list[tuple[str, str]] | None = None) -> int:
        """Un-mark items (their current copies); the next run recomputes them. Returns how many."""
        st = self.state(stage, key)
        if pairs is None:
            pairs = [(i, p) for i in items if (p := st.pack_of(i)) is not None]
        if not pairs:
            return 0
        name = write_drops(self.backend, self.stage_dir(stage, key), pairs, reason)
        st.add_drops(pairs, name)
        return len(pairs)

    # ----------------------------------------------------------------- journal
    def journal(self, run_id: str, content: Mapping[str, Any]) -> RunJournal:
        return RunJournal(self.backend, run_id, content, self.leases.ttl)

    def runs(self) -> tuple[list[RunEntry], list[tuple[str, str]]]:
        return read_journals(self.backend)

    # ----------------------------------------------------------------- tables
    def table_path(self, table: str, name: str) -> str:
        """Path (or URL path) of ``tables/<table>/<name>.parquet``."""
        return self.backend.path(TABLES, check_name("table", table), f"{check_name('table name', name)}.parquet")

    def table_names(self, table: str) -> list[str]:
        """Names of the Parquet files of one table, sorted."""
        return sorted(n[: -len(".parquet")] for n in self.backend.listdir(self.backend.path(TABLES, check_name("table", table)))
                      if n.endswith(".parquet") and not n.startswith("."))
