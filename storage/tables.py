"""Parquet tables of the store, each with an explicit pyarrow schema.

Tables live at ``tables/<table>/<name>.parquet`` in the store:

- ``manifests/<dataset>``: one row per image of an ingested dataset (``MANIFEST_SCHEMA``).
- ``runs/<run_id>``: one row per stage of one run (``RUN_SCHEMA``): the run record.
- ``failures/<run_id>``: one row per failed image and stage (``FAILURE_SCHEMA``).
- ``metrics/<experiment>``: one row per experiment x dataset x class plus a summary row
  (``METRICS_SCHEMA``).

Writes are atomic: a temporary file written, fsynced and renamed into place (local) or one object
PUT (remote); pages carry CRC checksums that reads verify.

A file that cannot be read as its table (garbage, truncated, zero bytes, a failed page checksum,
another table's file, columns of the wrong type) raises :class:`TableDamagedError` naming the
file, what is wrong and what rebuilds it; ``read_table(..., on_damaged=callback)`` skips such
files instead, so a listing command can show the rest and warn.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import Store

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("rel_path", pa.string(), nullable=False),
        pa.field("abs_path", pa.string(), nullable=False),
        pa.field("gt_path", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("file_stat", pa.string(), nullable=False),
    ],
    metadata={"table": "manifest", "version": "2"},
)

RUN_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("params_json", pa.string(), nullable=False),
        pa.field("upstream_json", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
        pa.field("weights_json", pa.string(), nullable=False),
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("images_total", pa.int64(), nullable=False),
        pa.field("images_done", pa.int64(), nullable=False),
        pa.field("images_cached", pa.int64(), nullable=False),
        pa.field("images_skipped", pa.int64(), nullable=False),
        pa.field("images_failed", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("started", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("ended", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("config_json", pa.string(), nullable=False),
        pa.field("software_json", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # the run's outcome: complete | incomplete | failed | interrupted
        pa.field("methods", pa.string(), nullable=False),  # the methods whose results depend on the stage output
    ],
    metadata={"table": "run", "version": "2"},
)

FAILURE_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("methods", pa.string(), nullable=False),  # the methods whose results depend on the stage output
    ],
    metadata={"table": "failure", "version": "2"},
)

METRICS_SCHEMA = pa.schema(
    [
        pa.field("experiment", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),  # -1 on the summary row
        pa.field("class_name", pa.string(), nullable=False),  # "__summary__" on the summary row
        pa.field("iou", pa.float64(), nullable=True),
        pa.field("acc", pa.float64(), nullable=True),
        pa.field("miou", pa.float64(), nullable=True),
        pa.field("aacc", pa.float64(), nullable=True),
        pa.field("images", pa.int64(), nullable=False),  # images scored
        pa.field("images_total", pa.int64(), nullable=False),  # images of the dataset with ground truth (0: not recorded)
        pa.field("complete", pa.bool_(), nullable=False),  # every image of the dataset scored
        pa.field("gt_out_of_range", pa.int64(), nullable=False),  # scored pixels whose ground truth is outside the classes
        pa.field("prediction_stage", pa.string(), nullable=False),  # "reconstruction" or "map_correction"
        pa.field("prediction_key", pa.string(), nullable=False),
        pa.field("random_weights", pa.bool_(), nullable=False),
        pa.field("params_json", pa.string(), nullable=False),
    ],
    metadata={"table": "metrics", "version": "2"},
)

SCHEMAS: Mapping[str, pa.Schema] = {
    "manifests": MANIFEST_SCHEMA,
    "runs": RUN_SCHEMA,
    "failures": FAILURE_SCHEMA,
    "metrics": METRICS_SCHEMA,
}


# What rebuilds a damaged file of each table ({path} is the file).
_REBUILD = {
    "manifests": "rebuild it by ingesting the dataset again (ovseg ingest ..., or ovseg run EXPERIMENT.yaml, which "
                 "ingests first and rewrites the manifest); if a command still stops on it, delete {path}",
    "runs": "it is the record of one past run and no result depends on it: delete {path}",
    "failures": "it lists the failed images of one past run and no result depends on it: delete {path}",
    "metrics": "rerun the experiment (ovseg run EXPERIMENT.yaml): its metrics are recomputed from the stored "
               "per-image confusion matrices; or delete {path}",
}
_TABLE_OF_METADATA = {s.metadata[b"table"].decode(): t for t, s in SCHEMAS.items()}


class TableDamagedError(ValueError):
    """A Parquet file of the store that cannot be read as its table.

    Attributes: ``table`` (e.g. ``"manifests"``), ``name`` (file name without ``.parquet``),
    ``path`` (full path or URL of the file), ``problem`` (what is wrong).
    """

    def __init__(self, table: str, name: str, path: str, problem: str):
        self.table, self.name, self.path, self.problem = table, name, path, problem
        super().__init__(f"damaged {table} table file {path}: {problem}; {_REBUILD[table].format(path=path)}")


def _schema(table: str) -> pa.Schema:
    try:
        return SCHEMAS[table]
    except KeyError as e:
        raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}") from e


def write_table(store: Store, table: str, name: str, rows: Sequence[Mapping[str, Any]] | pa.Table) -> str:
    """Write rows (dicts matching the table's schema) as ``tables/<table>/<name>.parquet``; returns its path."""
    schema = _schema(table)
    if isinstance(rows, pa.Table):
        tbl = rows.select(schema.names).cast(schema)
    else:
        missing = [f for r in rows[:1] for f in schema.names if f not in r]
        if missing:
            raise ValueError(f"rows for table {table!r} lack fields {missing}")
        tbl = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    path = store.table_path(table, name)
    buf = io.BytesIO()
    pq.write_table(tbl, buf, write_page_checksum=True)
    store.backend.put_atomic(path, buf.getvalue())  # all or nothing; a failed write leaves no temporary file
    return path


def _conform(tbl: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast a stored table to the current schema; columns added since it was written get defaults
    (null, or "" / 0 / False for non-nullable fields), so older stores stay readable."""
    for f in schema:
        if f.name not in tbl.column_names:
            if f.nullable:
                col = pa.nulls(tbl.num_rows, f.type)
            else:
                default = "" if pa.types.is_string(f.type) else False if pa.types.is_boolean(f.type) else 0
                col = pa.array([default] * tbl.num_rows, f.type)
            tbl = tbl.append_column(f, col)
    return tbl.select(schema.names).cast(schema)


class _Damage(Exception):
    """Internal: what is wrong with one file's bytes (turned into a TableDamagedError with its path)."""


def _display(store: Store, path: str) -> str:
    return path if store.is_local else store.fs.unstrip_protocol(path)


def _parse(data: bytes, table: str, schema: pa.Schema) -> pa.Table:
    """Parse one file's bytes as ``table``; raises ``_Damage`` saying what is wrong."""
    if not data:
        raise _Damage("the file is empty (0 bytes)")
    try:
        tbl = pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        detail = str(e).replace("Could not open Parquet input source '<Buffer>': ", "").strip().rstrip(".")
        raise _Damage(f"not a readable Parquet file ({len(data)} bytes): {detail}") from e
    kind = (tbl.schema.metadata or {}).get(b"table", b"").decode(errors="replace")
    if _TABLE_OF_METADATA.get(kind) != table:
        held = f"a {_TABLE_OF_METADATA[kind]} table" if kind in _TABLE_OF_METADATA else (
            f"an unknown table {kind!r}" if kind else "a Parquet file without ovseg's table name (not written by ovseg)")
        raise _Damage(f"it holds {held}, not {table}")
    try:
        return _conform(tbl, schema)
    except (pa.ArrowException, ValueError) as e:
        raise _Damage(f"its columns do not match the {table} schema ({e})") from e


def read_table(
    store: Store,
    table: str,
    names: Iterable[str] | None = None,
    on_damaged: Callable[[TableDamagedError], None] | None = None,
) -> pa.Table:
    """Read one, several or all Parquet files of a table into one ``pa.Table`` with the table's schema.

    Args:
        store: the store.
        table: one of :data:`SCHEMAS` (``manifests``, ``runs``, ``failures``, ``metrics``).
        names: file names without ``.parquet``; ``None`` = every file of the table.
        on_damaged: ``None`` (default) raises on the first damaged file; a callable is given
            each :class:`TableDamagedError` and the file is skipped (e.g. ``damaged.append``,
            then warn with each error's message).

    Raises:
        TableDamagedError: a file is damaged and ``on_damaged`` is None.
        FileNotFoundError: a named file does not exist.
        ValueError: unknown table.
    """
    schema = _schema(table)
    wanted = list(names) if names is not None else store.table_names(table)
    parts = []
    for n in wanted:
        path = store.table_path(table, n)
        try:
            data = store.backend.get(path)  # one request; other I/O errors propagate as such: they are not damage
        except FileNotFoundError as e:
            raise FileNotFoundError(f"table {table}/{n} not found in {store.location}") from e
        try:
            parts.append(_parse(data, table, schema))
        except _Damage as e:
            err = TableDamagedError(table, n, _display(store, path), str(e))
            if on_damaged is None:
                raise err from e.__cause__
            on_damaged(err)
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts)


def verify_tables(store: Store, repair: bool = False) -> dict[str, tuple[int, list[TableDamagedError]]]:
    """Read every file of every table: ``{table: (files checked, damaged files)}``.

    With ``repair`` the damaged files are deleted: a run rebuilds manifests (re-ingest) and
    metrics (from the stored per-image matrices); a runs or failures file is the record of one
    past run, whose journal still lists it."""
    out = {}
    for table in SCHEMAS:
        damaged: list[TableDamagedError] = []
        read_table(store, table, on_damaged=damaged.append)
        if repair:
            for e in damaged:
                store.backend.delete(store.table_path(table, e.name))
        out[table] = (len(store.table_names(table)), damaged)
    return out
