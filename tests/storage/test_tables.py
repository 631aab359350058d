"""Parquet tables: round trips, damaged files named with their fix, skipping them, atomic writes."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.store import Store
from storage.tables import SCHEMAS, TableDamagedError, read_table, write_table

# The fix each table's message must give (independent of the code's wording elsewhere).
FIX = {
    "manifests": "ovseg ingest",
    "runs": "no result depends on it: delete",
    "failures": "no result depends on it: delete",
    "metrics": "recomputed from the stored per-image confusion matrices",
}


def _rows(table: str, n: int, tag: str = "a") -> list[dict[str, Any]]:
    """``n`` valid rows for ``table``: a value of the right type for every field."""
    out = []
    for i in range(n):
        row: dict[str, Any] = {}
        for f in SCHEMAS[table]:
            if pa.types.is_string(f.type):
                row[f.name] = f"{tag}-{f.name}-{i}"
            elif pa.types.is_integer(f.type):
                row[f.name] = i
            elif pa.types.is_floating(f.type):
                row[f.name] = i + 0.5
            elif pa.types.is_boolean(f.type):
                row[f.name] = i % 2 == 1
            else:
                row[f.name] = dt.datetime(2026, 1, 1, 0, 0, i, tzinfo=dt.timezone.utc)
        out.append(row)
    return out


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_round_trip_every_table(tmp_path: Path, table: str) -> None:
    s = Store(tmp_path / "st")
    rows = _rows(table, 3)
    write_table(s, table, "one", rows)
    assert read_table(s, table, ["one"]).to_pylist() == rows
    assert [p.name for p in Path(s.table_path(table, "one")).parent.iterdir()] == ["one.parquet"]  # no temp left


def _valid_bytes(tmp_path: Path, table: str) -> bytes:
    s = Store(tmp_path / "donor")
    return Path(write_table(s, table, "x", _rows(table, 50, "donor"))).read_bytes()


@pytest.mark.parametrize("table", sorted(SCHEMAS))
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_file_named_with_its_fix_and_skippable(tmp_path: Path, table: str, damage: str) -> None:
    s = Store(tmp_path / "st")
    write_table(s, table, "good", _rows(table, 2))
    bad = Path(s.table_path(table, "bad"))
    good = _valid_bytes(tmp_path, table)
    bad.write_bytes({"garbage": b"this is not parquet\n" * 20, "truncated": good[: len(good) // 2], "empty": b""}[damage])
    with pytest.raises(TableDamagedError) as e:
        read_table(s, table)
    msg = str(e.value)
    assert str(bad) in msg and f"damaged {table} table file" in msg and FIX[table] in msg
    assert "'<Buffer>'" not in msg
    assert ("the file is empty" if damage == "empty" else "not a readable Parquet file") in msg
    assert isinstance(e.value, ValueError) and (e.value.table, e.value.name, e.value.path) == (table, "bad", str(bad))
    skipped: list[TableDamagedError] = []
    assert read_table(s, table, on_damaged=skipped.append).to_pylist() == _rows(table, 2)
    assert [x.name for x in skipped] == ["bad"]
    with pytest.raises(TableDamagedError):
        read_table(s, table, ["bad"])


def test_file_of_another_table_is_named_as_such(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    runs_file = Path(write_table(s, "runs", "r1", _rows("runs", 1)))
    target = Path(s.table_path("manifests", "voc"))
    target.parent.mkdir(parents=True)
    target.write_bytes(runs_file.read_bytes())
    with pytest.raises(TableDamagedError, match=r"voc.parquet: it holds a runs table, not manifests; rebuild it"):
        read_table(s, "manifests")
    # a Parquet file ovseg did not write (no table name), and one with a column of the wrong type
    pq.write_table(pa.table({"dataset": ["x"]}), target)
    with pytest.raises(TableDamagedError, match="not written by ovseg"):
        read_table(s, "manifests")
    wrong = pa.Table.from_pylist(_rows("manifests", 1)).set_column(5, "width", pa.array(["wide"]))
    pq.write_table(wrong.replace_schema_metadata(SCHEMAS["manifests"].metadata), target)
    with pytest.raises(TableDamagedError, match="its columns do not match the manifests schema"):
        read_table(s, "manifests")


def test_flipped_byte_in_a_data_page_fails_its_checksum(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    path = Path(write_table(s, "manifests", "voc", _rows("manifests", 200)))
    col = pq.ParquetFile(path).metadata.row_group(0).column(2)  # rel_path: 200 distinct strings
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 3] ^= 0xFF  # inside the page body
    path.write_bytes(bytes(data))
    with pytest.raises(TableDamagedError, match="CRC checksum verification failed"):
        read_table(s, "manifests")


def test_memory_store_names_the_url(tmp_path: Path) -> None:
    s = Store("memory://ovseg-tables-damaged")
    s.fs.pipe(s.table_path("metrics", "exp"), b"garbage")
    with pytest.raises(TableDamagedError, match=r"memory://.*/tables/metrics/exp.parquet: not a readable"):
        read_table(s, "metrics")


def test_concurrent_writers_of_one_table_leave_a_whole_file(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    versions = [_rows("failures", 300, f"w{k}") for k in range(6)]
    errors: list[BaseException] = []

    def writer(rows: list[dict[str, Any]]) -> None:
        try:
            for _ in range(5):
                write_table(s, "failures", "run1", rows)
        except BaseException as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert read_table(s, "failures").to_pylist() in versions
    assert [p.name for p in Path(s.table_path("failures", "run1")).parent.iterdir()] == ["run1.parquet"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    s = Store(tmp_path / "st")
    write_table(s, "runs", "r", _rows("runs", 1))
    bad = _rows("runs", 1)
    bad[0]["seconds"] = "not a number"
    with pytest.raises((pa.ArrowException, TypeError, ValueError)):
        write_table(s, "runs", "r", bad)
    assert read_table(s, "runs").to_pylist() == _rows("runs", 1)
