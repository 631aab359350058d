"""Parquet tables of the store, each with an explicit pyarrow schema.

Tables live at ``tables/<table>/<name>.parquet`` in the store:

- ``manifests/<dataset>``: one row per image of an ingested dataset (``MANIFEST_SCHEMA``).
- ``runs/<run_id>``: one row per stage of one run (``RUN_SCHEMA``): the run record.
- ``failures/<run_id>``: one row per failed image and stage (``FAILURE_SCHEMA``).
- ``metrics/<experiment>``: one row per experiment x dataset x class plus a summary row
  (``METRICS_SCHEMA``).

Writes are atomic: a temporary file renamed into place (local) or one object PUT (remote).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
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
    if store.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        pq.write_table(tbl, tmp)
        os.replace(tmp, path)
    else:
        buf = io.BytesIO()
        pq.write_table(tbl, buf)
        store.fs.pipe(path, buf.getvalue())
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


def read_table(store: Store, table: str, names: Iterable[str] | None = None) -> pa.Table:
    """Read one, several or all Parquet files of a table into one ``pa.Table`` with the table's schema."""
    schema = _schema(table)
    wanted = list(names) if names is not None else store.table_names(table)
    parts = []
    for n in wanted:
        path = store.table_path(table, n)
        if not store.fs.exists(path):
            raise FileNotFoundError(f"table {table}/{n} not found in {store.location}")
        with store.fs.open(path, "rb") as f:
            parts.append(_conform(pq.read_table(f), schema))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts)
