"""The stage store: one Zarr v3 store per workspace, the source of truth for what is done.

Layout (all paths relative to the store root)::

    zarr.json                                         root group
    stages/<stage>/<key>/zarr.json                    stage group; attrs = StageKey payload (params, upstream keys,
                                                      code version, weights identity)
    stages/<stage>/<key>/<item>/zarr.json             one group per item (image id or vocabulary id); attrs = timings,
                                                      software versions, anything the stage records
    stages/<stage>/<key>/<item>/<array>/...           the item's arrays (one chunk per item or per window: writers of
                                                      different items never share a chunk or shard)
    stages/<stage>/<key>/.complete/<item>.json        the item's completion marker, written LAST (atomically); one
                                                      listing of this folder answers "what is done" for a stage
    locks/<stage>/<key>/<item>.lock                   lease of the process computing the item (local stores)
    tables/<table>/<name>.parquet                     manifests, run records, metrics (see ``storage.tables``)

An item without its marker is missing: it is never read as data, and the next writer
deletes whatever a crashed writer left there before writing again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from storage.keys import StageKey, to_jsonable

DEFAULT_STORE = "ovseg-store"
MARKERS = ".complete"
STAGES = "stages"
TABLES = "tables"
LOCKS = "locks"
LOCK_TTL_SECONDS = 6 * 3600.0


class StoreError(RuntimeError):
    """A store operation failed; the message names the store location and the item."""


class MissingOutputError(KeyError):
    """A requested stage output is not complete in the store."""


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


def _check_name(kind: str, name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name == "zarr.json":
        raise ValueError(f"invalid {kind} name {name!r}: must be non-empty, without '/', not starting with '.'")
    return name


@dataclass(frozen=True)
class StageInfo:
    """One stage output set as listed by ``Store.list_stages``."""

    stage: str
    key: str
    attrs: dict[str, Any]
    complete: int
    incomplete: int
    nbytes: int


class Store:
    """A Zarr v3 stage store on a local path or an fsspec URL (``s3://...``, ``memory://...``).

    Args:
        location: local directory or fsspec URL; default ``$OVSEG_STORE`` or ``./ovseg-store``.
        storage_options: passed to fsspec for remote stores.
    """

    def __init__(self, location: str | os.PathLike | None = None, storage_options: Mapping[str, Any] | None = None):
        self.location = resolve_location(location)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.location, **self.storage_options)
        self._registered: set[tuple[str, str]] = set()
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            self._zstore = zarr.storage.LocalStore(self.root)
        else:
            self._zstore = zarr.storage.FsspecStore.from_url(self.location, storage_options=self.storage_options or None)
        try:
            self._root_group = zarr.open_group(self._zstore, mode="a", zarr_format=3)
        except Exception as e:  # zarr raises several types for a non-store directory
            raise StoreError(
                f"cannot open {self.location} as a Zarr v3 store ({e}); point --store / OVSEG_STORE at an empty "
                "directory or an existing ovseg store"
            ) from e

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    # ----------------------------------------------------------------- paths
    def _p(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @staticmethod
    def _rel(stage: str, key: str, item: str | None = None) -> str:
        parts = [STAGES, _check_name("stage", stage), _check_name("key", key)]
        if item is not None:
            parts.append(_check_name("item", item))
        return "/".join(parts)

    # ----------------------------------------------------------------- stages
    def register_stage(self, stage_key: StageKey) -> None:
        """Create the stage group and record its key payload (idempotent)."""
        ident = (stage_key.stage, stage_key.key)
        if ident in self._registered:
            return
        rel = self._rel(*ident)
        grp = zarr.open_group(self._zstore, path=rel, mode="a", zarr_format=3)
        if "stage_key" not in grp.attrs:
            grp.update_attributes({"stage_key": stage_key.payload(), "created": time.time()})
        self._registered.add(ident)

    def stage_attrs(self, stage: str, key: str) -> dict[str, Any]:
        """The attrs of a stage group (its key payload); empty if unknown."""
        try:
            grp = zarr.open_group(self._zstore, path=self._rel(stage, key), mode="r", zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            return {}
        return dict(grp.attrs)

    # ----------------------------------------------------------------- completeness
    def is_complete(self, stage: str, key: str, item: str) -> bool:
        """True when the item's completion marker exists."""
        return self.fs.exists(self._marker(stage, key, item))

    def _marker(self, stage: str, key: str, item: str) -> str:
        return self._p(self._rel(stage, key), MARKERS, f"{_check_name('item', item)}.json")

    def complete_items(self, stage: str, key: str) -> set[str]:
        """All items of ``(stage, key)`` that carry a completion marker (one listing, not one call per item)."""
        base = self._p(self._rel(stage, key), MARKERS)
        if self.is_local:
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                return set()
        else:
            if not self.fs.exists(base):
                return set()
            names = [p.rstrip("/").split("/")[-1] for p in self.fs.ls(base, detail=False)]
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def missing(self, stage: str, key: str, items: Iterable[str]) -> list[str]:
        """The subset of ``items`` (order kept) without a complete output."""
        done = self.complete_items(stage, key)
        return [i for i in items if i not in done]

    def items(self, stage: str, key: str) -> tuple[set[str], set[str]]:
        """``(complete, incomplete)`` item ids present under ``(stage, key)``."""
        base = self._p(self._rel(stage, key))
        if not self.fs.exists(base):
            return set(), set()
        present = {
            name
            for name in (p.rstrip("/").split("/")[-1] for p in self.fs.ls(base, detail=False))
            if not name.startswith(".") and name != "zarr.json"
        }
        done = self.complete_items(stage, key)
        return done, present - done

    # ----------------------------------------------------------------- write / read
    def write_item(
        self,
        stage_key: StageKey,
        item: str,
        arrays: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any] | None = None,
        chunk_first_axis: Iterable[str] = (),
    ) -> None:
        """Write one item's arrays and attrs, then its completion marker.

        Leftovers of an earlier crashed write are removed first. Each array is stored as one
        chunk, or one chunk per leading index for the names in ``chunk_first_axis`` (per-window
        arrays), so concurrent writers of different items never touch the same chunk.
        """
        for name, arr in arrays.items():
            _check_name("array", name)
            if np.ndim(arr) == 0:
                raise ValueError(f"array {name!r} of {stage_key.stage}/{item} is 0-dimensional; record scalars in attrs instead")
        self.register_stage(stage_key)
        rel = self._rel(stage_key.stage, stage_key.key, item)
        path = self._p(rel)
        if self.fs.exists(self._marker(stage_key.stage, stage_key.key, item)):
            self.fs.rm(self._marker(stage_key.stage, stage_key.key, item))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        per_window = set(chunk_first_axis)
        meta = {"stage": stage_key.stage, "key": stage_key.key, "item": item, **to_jsonable(dict(attrs or {}))}
        grp = zarr.open_group(self._zstore, path=rel, mode="w", zarr_format=3, attributes=meta)
        for name, arr in arrays.items():
            a = np.ascontiguousarray(arr)
            if name in per_window:
                chunks: tuple[int, ...] = (1, *a.shape[1:])
            else:
                chunks = a.shape
            chunks = tuple(max(int(c), 1) for c in chunks)
            grp.create_array(name, data=a, chunks=chunks)
        self._write_marker(
            self._marker(stage_key.stage, stage_key.key, item), {"completed": time.time(), "arrays": sorted(arrays)}
        )

    def _write_marker(self, target: str, content: Mapping[str, Any]) -> None:
        data = json.dumps(content).encode()
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:  # object-store PUTs are atomic
            self.fs.pipe(target, data)

    def read_item(self, stage: str, key: str, item: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Read a complete item's arrays (all, or ``names``). Raises ``MissingOutputError`` if not complete."""
        if not self.is_complete(stage, key, item):
            raise MissingOutputError(
                f"{stage}/{key}/{item} is not complete in {self.location}; run the stage first (ovseg run / ovseg stage {stage})"
            )
        grp = zarr.open_group(self._zstore, path=self._rel(stage, key, item), mode="r", zarr_format=3)
        wanted = list(names) if names is not None else [n for n, _ in grp.arrays()]
        out = {}
        for n in wanted:
            if n not in grp:
                raise MissingOutputError(f"{stage}/{key}/{item} has no array {n!r} (has {sorted(k for k, _ in grp.arrays())})")
            out[n] = grp[n][...]
        return out

    def item_attrs(self, stage: str, key: str, item: str) -> dict[str, Any]:
        """The attrs of a complete item."""
        if not self.is_complete(stage, key, item):
            raise MissingOutputError(f"{stage}/{key}/{item} is not complete in {self.location}")
        grp = zarr.open_group(self._zstore, path=self._rel(stage, key, item), mode="r", zarr_format=3)
        return dict(grp.attrs)

    def delete_item(self, stage: str, key: str, item: str) -> None:
        """Remove one item (marker first, so a partial delete never leaves complete-looking data)."""
        path = self._p(self._rel(stage, key, item))
        marker = self._marker(stage, key, item)
        if self.fs.exists(marker):
            self.fs.rm(marker)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ----------------------------------------------------------------- listing and gc
    def list_stages(self, with_bytes: bool = True) -> list[StageInfo]:
        """Every ``(stage, key)`` in the store with its attrs, item counts and bytes on disk."""
        out = []
        base = self._p(STAGES)
        if not self.fs.exists(base):
            return out
        for stage_path in sorted(self.fs.ls(base, detail=False)):
            if not self.fs.isdir(stage_path):
                continue
            stage = stage_path.rstrip("/").split("/")[-1]
            for key_path in sorted(self.fs.ls(stage_path, detail=False)):
                if not self.fs.isdir(key_path):
                    continue
                key = key_path.rstrip("/").split("/")[-1]
                done, partial = self.items(stage, key)
                nbytes = self._du(key_path) if with_bytes else 0
                out.append(StageInfo(stage, key, self.stage_attrs(stage, key), len(done), len(partial), nbytes))
        return out

    def _du(self, path: str) -> int:
        if self.is_local:
            total = 0
            for dirpath, _, files in os.walk(path):
                for f in files:
                    try:
                        total += os.path.getsize(os.path.join(dirpath, f))
                    except OSError:
                        pass
            return total
        return int(self.fs.du(path))

    def gc(self, keep: Iterable[tuple[str, str]], dry_run: bool = False, incomplete: bool = True) -> list[str]:
        """Delete stage outputs whose ``(stage, key)`` is not in ``keep``, and incomplete leftovers.

        Returns the removed relative paths (what would be removed with ``dry_run``).
        """
        keep_set = set(keep)
        removed = []
        for info in self.list_stages(with_bytes=False):
            if (info.stage, info.key) not in keep_set:
                rel = self._rel(info.stage, info.key)
                removed.append(rel)
                if not dry_run:
                    self.fs.rm(self._p(rel), recursive=True)
                    self._registered.discard((info.stage, info.key))
            elif incomplete and info.incomplete:
                _, partial = self.items(info.stage, info.key)
                for item in sorted(partial):
                    if self._lock_alive(info.stage, info.key, item):
                        continue  # someone is writing it right now
                    rel = self._rel(info.stage, info.key, item)
                    removed.append(rel)
                    if not dry_run:
                        self.fs.rm(self._p(rel), recursive=True)
        return removed

    # ----------------------------------------------------------------- leases
    def _lock_path(self, stage: str, key: str, item: str) -> str:
        return self._p(LOCKS, _check_name("stage", stage), _check_name("key", key), f"{_check_name('item', item)}.lock")

    def try_claim(self, stage: str, key: str, item: str, ttl: float = LOCK_TTL_SECONDS) -> bool:
        """Claim the right to compute an item; False if another live process holds it.

        Local stores use an exclusive-create lock file holding host, pid and time; a lock whose
        process is gone (same host) or older than ``ttl`` is stale and taken over. Remote stores
        have no atomic create here: claims always succeed there (duplicate work is then possible
        but never corrupts, since items are written whole and marked last).
        """
        if not self.is_local:
            return True
        path = self._lock_path(stage, key, item)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._lock_alive(stage, key, item, ttl):
                    return False
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(record)
            return True
        return False

    def release(self, stage: str, key: str, item: str) -> None:
        """Release a claim taken with ``try_claim`` (no-op if absent)."""
        if not self.is_local:
            return
        try:
            os.remove(self._lock_path(stage, key, item))
        except FileNotFoundError:
            pass

    def _lock_alive(self, stage: str, key: str, item: str, ttl: float = LOCK_TTL_SECONDS) -> bool:
        if not self.is_local:
            return False
        path = self._lock_path(stage, key, item)
        try:
            with open(path, "rb") as f:
                rec = json.loads(f.read() or b"{}")
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if time.time() - float(rec.get("time", 0)) > ttl:
            return False
        if rec.get("host") == socket.gethostname():
            pid = int(rec.get("pid", -1))
            if pid == os.getpid():
                return True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True

    # ----------------------------------------------------------------- tables
    def table_path(self, table: str, name: str) -> str:
        """Path (or URL path) of ``tables/<table>/<name>.parquet``."""
        return self._p(TABLES, _check_name("table", table), f"{_check_name('table name', name)}.parquet")

    def table_names(self, table: str) -> list[str]:
        """Names of the Parquet files of one table, sorted."""
        base = self._p(TABLES, _check_name("table", table))
        if not self.fs.exists(base):
            return []
        return sorted(
            p.rstrip("/").split("/")[-1][: -len(".parquet")]
            for p in self.fs.ls(base, detail=False)
            if p.endswith(".parquet")
        )
