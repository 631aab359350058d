"""Row files (``storage.row_files``): an imported value store written in chunks and read by row id, each row
checked against its CRC-32; damage is found by the read and by ``cache verify``."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from storage.fserrors import StoreWriteError
from storage.keys import StageKey
from storage.maintenance import verify
from storage.reading import DamagedOutputError
from storage.row_files import ROW_FILE, ROWS, FileRows, write_row_file
from storage.store import Store

SK = StageKey("bank_values", {"source": "test"})


def _written(tmp_path, n: int = 1000, dim: int = 24) -> tuple[Store, np.ndarray]:
    store = Store(tmp_path / "store")
    rows = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16)
    assert write_row_file(store, SK, (rows[i:i + 300] for i in range(0, n, 300))) == (n, dim)
    return store, rows


def test_rows_read_by_id_equal_the_written_rows_in_any_order(tmp_path):
    store, rows = _written(tmp_path)
    assert store.complete_items(SK.stage, SK.key) == {ROWS}
    reader = FileRows(Store(tmp_path / "store"), SK.stage, SK.key)
    ids = np.array([999, 0, 5, 6, 7, 5, 300, 299, 301])  # unsorted, repeated, runs across written chunks
    np.testing.assert_array_equal(reader.rows(ids), rows[ids])
    np.testing.assert_array_equal(reader.rows(np.arange(1000)), rows)
    assert reader.rows(np.empty(0, np.int64)).shape == (0, 24)
    with pytest.raises(ValueError, match=r"0\.\.999"):
        reader.rows(np.array([1000]))
    assert verify(store, [(SK.stage, SK.key)])[0].ok


def test_a_damaged_row_is_never_returned_and_cache_verify_finds_it(tmp_path):
    store, rows = _written(tmp_path)
    path = tmp_path / "store" / "stages" / SK.stage / SK.key / ROW_FILE
    data = bytearray(path.read_bytes())
    data[700 * 48 + 3] ^= 0x01  # row 700
    path.write_bytes(bytes(data))
    (rep,) = verify(store, [(SK.stage, SK.key)])
    assert [i for i, _ in rep.damaged] == [ROWS] and "row 700 does not match" in rep.damaged[0][1]
    assert store.complete_items(SK.stage, SK.key) == {ROWS}  # verify without repair un-marks nothing
    reader = FileRows(store, SK.stage, SK.key)
    np.testing.assert_array_equal(reader.rows(np.array([699, 701])), rows[[699, 701]])  # other rows still read
    with pytest.raises(DamagedOutputError, match="row 700 does not match its CRC-32"):
        reader.rows(np.array([3, 700]))
    assert ROWS not in Store(tmp_path / "store").complete_items(SK.stage, SK.key)  # un-marked: imported again


def test_a_truncated_file_is_found(tmp_path):
    store, _ = _written(tmp_path)
    path = tmp_path / "store" / "stages" / SK.stage / SK.key / ROW_FILE
    path.write_bytes(path.read_bytes()[: 990 * 48])
    (rep,) = verify(store, [(SK.stage, SK.key)])
    assert not rep.ok and "read" in rep.damaged[0][1]
    with pytest.raises(DamagedOutputError, match="rows 995..995: read 0 of 48 bytes"):
        FileRows(store, SK.stage, SK.key).rows(np.array([995]))


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_a_full_disk_is_a_store_write_error_and_leaves_no_temporary(small_disk):
    store = Store(small_disk / "store")
    rows = np.random.default_rng(1).standard_normal((1000, 1024)).astype(np.float16)  # 2 MB on a 1 MB disk
    with pytest.raises(StoreWriteError, match=r"cannot write .*/rows/values\.f16: No space left on device") as got:
        write_row_file(store, SK, (rows[i:i + 100] for i in range(0, 1000, 100)))
    assert got.value.errno == errno.ENOSPC  # a raw OSError before: the CLI's exit 2, as for bad input
    assert not list(small_disk.rglob(".tmp-*")) and not list(small_disk.rglob("values.f16"))
    assert ROWS not in store.complete_items(SK.stage, SK.key)
    assert write_row_file(store, SK, [rows[:200]]) == (200, 1024)  # the space is free again: the write completes
    assert verify(store, [(SK.stage, SK.key)])[0].ok


def test_a_reader_held_across_a_repair_reads_the_file_written_again(tmp_path):
    """A serving process's reader, opened before the damage, reads the re-imported file (not the damaged one it
    held open) and neither un-marks the new item nor reports damage."""
    store, rows = _written(tmp_path)
    held = FileRows(Store(tmp_path / "store"), SK.stage, SK.key)  # a long-lived process's view
    path = tmp_path / "store" / "stages" / SK.stage / SK.key / ROW_FILE
    data = bytearray(path.read_bytes())
    data[700 * 48 + 3] ^= 0x01  # row 700, in place: the held descriptor sees it
    path.write_bytes(bytes(data))
    (rep,) = verify(store, [(SK.stage, SK.key)], repair=True)
    assert rep.repaired == 1 and ROWS not in Store(tmp_path / "store").complete_items(SK.stage, SK.key)
    with pytest.raises(DamagedOutputError, match="row 700 does not match"):  # not imported again yet
        held.rows(np.array([700]))
    write_row_file(Store(tmp_path / "store"), SK, [rows])  # `ovseg bank import` again: a new file at the path
    np.testing.assert_array_equal(held.rows(np.array([700, 3, 999])), rows[[700, 3, 999]])
    np.testing.assert_array_equal(held.rows(np.arange(1000)), rows)
    assert ROWS in Store(tmp_path / "store").complete_items(SK.stage, SK.key)  # the new item stays marked
    assert verify(Store(tmp_path / "store"), [(SK.stage, SK.key)])[0].ok
