"""The stage store: the source of truth for what is done, on a local folder or an fsspec URL.

Its layout and names: ``storage.paths``; its read path: ``storage.reading``; its write path:
``storage.writing`` (packs, then completion records).

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
from typing import Any

import numpy as np

from storage.fsio import Backend, s3_error
from storage.journal import RunEntry, RunJournal, read_journals
from storage.keys import StageKey
from storage.leases import DEFAULT_TTL, LeaseManager
from storage.paths import MARKER, STAGES, STORE_FORMAT, TABLES, check_name, resolve_location
from storage.reading import DamagedOutputError, MissingOutputError, StoreReader
from storage.records import PACKS, RECORDS, StageState, write_drops
from storage.writing import PackSession

__all__ = ["DamagedOutputError", "MissingOutputError", "Store", "StoreError", "StoreNotFoundError"]

log = logging.getLogger("ovseg.storage")


class StoreError(RuntimeError):
    """A store operation failed; the message names the store location and the item."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A read-only command was pointed at a store that does not exist."""


class Store(StoreReader):
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
            if isinstance(e, OSError):  # not a damaged marker: the path cannot hold a store (a file on it, rights)
                raise StoreError(f"cannot open the store {self.location}: {type(e).__name__}: {e}; point --store / "
                                 "OVSEG_STORE at a folder (a part of this path is a file, or not readable)") from e
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

    def remove_damaged_records(self, stage: str, key: str) -> list[str]:
        """Delete the unreadable completion records of the set, with their packs; returns their paths.

        Such a record marks nothing complete (its items count as incomplete and are recomputed), so
        removing it loses nothing; a run does this once its items are complete again, and
        ``cache verify --repair`` at once."""
        st = self.state(stage, key)
        removed = []
        for path in [p for p in st.damaged if f"/{RECORDS}/" in p]:
            pack = path.rsplit("/", 1)[-1][: -len(".json")]
            self.backend.delete(path)
            self.backend.delete(f"{self.stage_dir(stage, key)}/{PACKS}/{pack}.zip")
            st.damaged.pop(path, None)
            removed.append(path)
        return removed

    def missing(self, stage: str, key: str, items: Iterable[str]) -> list[str]:
        done = self.complete_items(stage, key)
        return [i for i in items if i not in done]

    # ----------------------------------------------------------------- writing
    def open_pack(self, stage_key: StageKey, meta: Mapping[str, Any] | None = None) -> PackSession:
        """Start a pack for a batch of items of ``stage_key`` (registers the stage)."""
        self.register_stage(stage_key)
        return PackSession(self, stage_key, dict(meta or {}))

    def write_item(self, stage_key: StageKey, item: str, arrays: Mapping[str, np.ndarray],
                   attrs: Mapping[str, Any] | None = None) -> None:
        """Write one item as its own pack (batches use ``open_pack``)."""
        with self.open_pack(stage_key) as pack:
            pack.add(item, arrays, attrs or {})


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
