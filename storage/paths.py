"""Names and locations in a store: where the store is, its top-level folders, valid names.

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

The folders inside a stage output set are named in ``storage.records``, ``leases/`` in
``storage.leases`` and ``journal/`` in ``storage.journal``. Both the read path
(``storage.reading``) and the write path (``storage.writing``) of ``storage.store`` use these.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = "ovseg-store"
STAGES = "stages"
TABLES = "tables"
MARKER = "ovseg-store.json"
STORE_FORMAT = 2


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


def is_remote(location: str) -> bool:
    """Whether a resolved store location (``resolve_location``) is an object-store or other fsspec URL."""
    return "://" in str(location)


def check_name(kind: str, name: str) -> str:
    if not name or "/" in name or name.startswith(".") or name in ("zarr.json", "stage.json"):
        raise ValueError(f"invalid {kind} name {name!r}: must be non-empty, without '/', not starting with '.'")
    return name
