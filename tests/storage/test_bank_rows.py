"""A built bank's values in region-id order (``storage.bank_rows``): per-image items consolidated into append-only
segments, read by id (local store and S3), grown by appending, damage found by the read and by ``cache verify``."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from storage.bank_rows import RowSegments, SegmentRows, consolidate_values, merge_plan
from storage.fserrors import StoreWriteError
from storage.fsio import is_temporary
from storage.keys import StageKey
from storage.maintenance import gc, verify
from storage.reading import DamagedOutputError
from storage.store import Store
from tests.conftest import fill_disk
from tests.s3server import shared_server

VALUES = StageKey("bank_values", {"clip": "test"})
INDEX = StageKey("bank_index", {"bank": "b"})
DIM = 12


def _images(store: Store, start: int, counts: list[int], seed: int) -> dict[str, np.ndarray]:
    """Per-image value items (two packs), as ``bank_values`` writes them; returns what was written."""
    rng = np.random.default_rng(seed)
    rows = {f"img-{start + i:03d}": rng.standard_normal((c, DIM)).astype(np.float16) for i, c in enumerate(counts)}
    names = list(rows)
    for part in (names[: len(names) // 2], names[len(names) // 2:]):
        with store.open_pack(VALUES) as pack:
            for n in part:
                ids = np.arange(1, rows[n].shape[0] + 1)
                pack.add(n, {"values": rows[n], "mask_ids": ids, "areas": ids}, {})
    return rows


def _registry(rows: dict[str, np.ndarray]) -> tuple[list[str], list[int], list[int]]:
    names = list(rows)
    count = [rows[n].shape[0] for n in names]
    return names, list(np.cumsum([0] + count[:-1]).tolist()), count


def _consolidate(store: Store, rows: dict[str, np.ndarray], present=None) -> tuple[RowSegments, int]:
    names, first, count = _registry(rows)
    return consolidate_values(store, VALUES.stage, VALUES.key, "b", "regions", names, first, count,
                              names if present is None else present)


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    return str(tmp_path / "store") if request.param == "local" else f"s3://{shared_server().create_bucket()}/st"


def test_rows_equal_the_written_items_and_a_grown_bank_appends_only_its_new_rows(location):
    store = Store(location)
    rows = _images(store, 0, [5, 0, 7, 3, 9, 1], seed=0)
    rs, written = _consolidate(store, rows)
    every = np.concatenate(list(rows.values()))
    assert rs.segments == ((0, 25),) and written == 25 and rs.dim == DIM
    reader = SegmentRows(Store(location), rs)  # another process's view
    np.testing.assert_array_equal(reader.rows(np.arange(25)), every)
    ids = np.array([24, 0, 5, 6, 7, 5, 11, 12, 3])  # unsorted, repeated, runs across images
    np.testing.assert_array_equal(reader.rows(ids), every[ids])
    assert reader.rows(np.empty(0, np.int64)).shape == (0, DIM)
    first_segment = store.backend.get(rs.path(store, (0, 25)))
    # the bank grows: three more images; the segment in place is kept, the new ids appended
    rows.update(_images(store, 6, [4, 2, 6], seed=1))
    grown, written = _consolidate(store, rows)
    assert grown.segments == ((0, 25), (25, 37)) and written == 12
    assert store.backend.get(rs.path(store, (0, 25))) == first_segment
    every = np.concatenate(list(rows.values()))
    ids = np.random.default_rng(2).integers(0, 37, 200)
    np.testing.assert_array_equal(SegmentRows(Store(location), grown).rows(ids), every[ids])
    assert _consolidate(store, rows) == (grown, 0)  # a rerun writes nothing
    store.write_item(INDEX, "bank", {"x": np.zeros(1)}, {"value_rows": {"bank_values": grown.to_attrs()}})
    assert all(r.ok for r in verify(store))
    with pytest.raises(ValueError, match="ids of images no longer in the bank"):
        reader.rows(np.array([25]))  # not in the first index's segments


def test_images_no_longer_in_the_bank_are_gaps(tmp_path):
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [5, 4, 6, 2], seed=0)
    rs, written = _consolidate(store, rows, present=["img-000", "img-002", "img-003"])
    assert rs.segments == ((0, 5), (9, 17)) and written == 13
    every = np.concatenate(list(rows.values()))
    reader = SegmentRows(store, rs)
    np.testing.assert_array_equal(reader.rows(np.array([16, 0, 4, 9])), every[[16, 0, 4, 9]])
    with pytest.raises(ValueError, match="1-D array of the bank's ids"):
        reader.rows(np.array([6]))


@pytest.mark.parametrize("sizes, want", [
    ([100, 10], [[100], [10]]),
    ([100, 10, 10], [[100], [10, 10]]),  # 10 <= 2 x 10: merged
    ([100, 40], [[100], [40]]),
    ([100, 50], [[100, 50]]),  # 100 <= 2 x 50
    ([100, 20, 10], [[100], [20, 10]]),
    ([100, 20, 10, 10], [[100], [20, 10], [10]]),  # 20 <= 2 x 10 merged; then 30 > 2 x 10
    ([100, 99, 98], [[100, 99], [98]]),  # shrinking growth still merges: 199 > 2 x 98
    ([10, 100], [[10, 100]]),
    ([100, 40, 15, 10], [[100, 40, 15, 10]]),  # the carry runs up the whole run: 15 + 10, 40 + 25, 100 + 65
])
def test_a_segment_holding_at_most_twice_the_rows_of_the_next_is_merged_with_it(sizes, want):
    pieces = [(int(a), int(b)) for a, b in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes))]
    got = merge_plan(pieces)
    assert [[b - a for a, b in group] for group in got] == want
    assert [p for group in got for p in group] == pieces  # every piece once, in order


def test_a_bank_grown_many_times_keeps_few_segments_and_every_row(tmp_path):
    store = Store(tmp_path / "store")
    rng = np.random.default_rng(5)
    rows = _images(store, 0, list(rng.integers(1, 9, 40)), seed=0)
    _consolidate(store, rows)
    n, bound = 0, 0
    for night in range(1, 13):  # twelve extensions of 2-6 images (5-15 %)
        rows.update(_images(store, len(rows), list(rng.integers(1, 9, int(rng.integers(2, 7)))), seed=night))
        before = {p.name: p.stat().st_ino for p in (tmp_path / "store").rglob("*.rows")}
        rs, written = _consolidate(store, rows)
        every = np.concatenate(list(rows.values()))
        n = every.shape[0]
        sizes = [b - a for a, b in rs.segments]
        assert rs.segments[0][0] == 0 and rs.segments[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(rs.segments, rs.segments[1:]))  # adjacent, in order
        assert all(x > 2 * y for x, y in zip(sizes, sizes[1:])), sizes  # more than twice the rows of the next
        bound = max(bound, len(sizes))
        # what was not rewritten is the same file; what was written is the new rows and the merged segments
        kept = [s for s in rs.segments if rs.path(store, s).rsplit("/", 1)[1] in before]
        for s in kept:
            p = rs.path(store, s)
            assert os.stat(p).st_ino == before[p.rsplit("/", 1)[1]]
        assert written == n - sum(b - a for a, b in kept)
        np.testing.assert_array_equal(SegmentRows(Store(tmp_path / "store"), rs).rows(np.arange(n)), every)
        assert _consolidate(store, rows) == (rs, 0)  # a rerun writes nothing
    assert 2 <= bound <= int(np.log2(n)) + 1  # what more than twice the rows of the next allows


def test_segments_merge_on_an_object_store_too():
    location = f"s3://{shared_server().create_bucket()}/st"
    store = Store(location)
    rows = _images(store, 0, [6, 4], seed=0)
    assert _consolidate(store, rows)[0].segments == ((0, 10),)
    rows.update(_images(store, 2, [2, 2], seed=1))
    assert _consolidate(store, rows)[0].segments == ((0, 10), (10, 14))  # 10 > 2 x 4: kept
    rows.update(_images(store, 4, [4, 3], seed=2))  # 7 more: 4 <= 2 x 7, then 10 <= 2 x 11: one segment
    merged, written = _consolidate(store, rows)
    assert merged.segments == ((0, 21),) and written == 21
    every = np.concatenate(list(rows.values()))
    np.testing.assert_array_equal(SegmentRows(Store(location), merged).rows(np.arange(21)), every)


def test_a_damaged_segment_read_for_a_merge_is_written_again_from_the_items(tmp_path, caplog):
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [3, 2], seed=0)
    rs, _ = _consolidate(store, rows)
    assert rs.segments == ((0, 5),)
    path = rs.path(store, (0, 5))
    _damage(path, lambda data: _flip_row(data, 1))
    rows.update(_images(store, 2, [4, 3], seed=1))  # 7 new rows: the 5-row segment merges with them
    grown, written = _consolidate(store, rows)
    assert grown.segments == ((0, 12),) and written == 12
    assert "row 1 does not match its CRC-32" in caplog.text and "writing its rows again" in caplog.text
    assert not os.path.exists(path)  # the damaged segment was removed
    np.testing.assert_array_equal(SegmentRows(store, grown).rows(np.arange(12)), np.concatenate(list(rows.values())))


def _damaged_store(tmp_path, damage) -> tuple[Store, dict[str, np.ndarray], RowSegments, str]:
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [5, 0, 7, 3, 9, 1], seed=0)
    rs, _ = _consolidate(store, rows)
    store.write_item(INDEX, "bank", {"x": np.zeros(1)}, {"value_rows": {"bank_values": rs.to_attrs()}})
    path = rs.path(store, (0, 25))
    _damage(path, damage)
    return store, rows, rs, path


def _damage(path: str, damage) -> None:
    """Rewrite the file at ``path`` with ``damage(its bytes)``."""
    data = bytearray(open(path, "rb").read())
    with open(path, "wb") as f:
        f.write(damage(data))


def _flip_row(data: bytearray, row: int = 7) -> bytes:
    data[row * DIM * 2 + 1] ^= 0x01
    return bytes(data)


def test_a_damaged_row_is_never_returned_unmarks_its_index_and_is_written_again(tmp_path):
    store, rows, rs, path = _damaged_store(tmp_path, _flip_row)
    (rep,) = [r for r in verify(store) if r.stage == "bank_index"]
    assert [i for i, _ in rep.damaged] == ["bank"] and "row 7 does not match its CRC-32" in rep.damaged[0][1]
    assert os.path.exists(path) and store.complete_items(INDEX.stage, INDEX.key) == {"bank"}  # verify changes nothing
    reader = SegmentRows(store, rs, (INDEX.stage, INDEX.key, "bank"))
    every = np.concatenate(list(rows.values()))
    np.testing.assert_array_equal(reader.rows(np.array([6, 8])), every[[6, 8]])  # other rows still read
    with pytest.raises(DamagedOutputError, match="row 7 does not match its CRC-32.*the next `ovseg run` writes"):
        reader.rows(np.array([3, 7]))
    assert not os.path.exists(path) and "bank" not in Store(tmp_path / "store").complete_items(INDEX.stage, INDEX.key)
    again, written = _consolidate(store, rows)  # what the rebuilt index item does
    assert again == rs and written == 25
    np.testing.assert_array_equal(SegmentRows(store, again).rows(np.arange(25)), every)


def test_a_truncated_segment_is_found_by_verify_and_repair_removes_it(tmp_path):
    store, rows, rs, path = _damaged_store(tmp_path, lambda d: bytes(d[: 20 * DIM * 2]))
    (rep,) = [r for r in verify(store, checksums=False) if r.stage == "bank_index"]  # `cache verify --sizes-only`
    assert not rep.ok and "a complete segment has" in rep.damaged[0][1]
    (rep,) = [r for r in verify(store) if r.stage == "bank_index"]
    assert not rep.ok and "CRC bytes" in rep.damaged[0][1]
    (rep,) = [r for r in verify(store, repair=True) if r.stage == "bank_index"]
    assert rep.repaired == 1 and not os.path.exists(path)
    assert "bank" not in Store(tmp_path / "store").complete_items(INDEX.stage, INDEX.key)
    assert _consolidate(store, rows)[1] == 25  # the short file is not taken for a written segment


def test_a_killed_writer_leaves_a_temporary_that_is_not_a_segment_and_gc_removes(tmp_path):
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [5, 7], seed=0)
    rs, _ = _consolidate(store, rows)
    folder = rs.folder(store)
    os.replace(rs.path(store, (0, 12)), store.backend.tmp_path_for(rs.path(store, (0, 12))))  # as a kill leaves it
    assert _consolidate(store, rows) == (rs, 12)
    names = os.listdir(folder)
    assert len(names) == 2
    (tmp,) = [n for n in names if is_temporary(n)]
    os.utime(f"{folder}/{tmp}", (0, 0))
    assert gc(store, store.stage_sets(), stale_after=60).temporaries == 1
    assert os.listdir(folder) == [os.path.basename(rs.path(store, (0, 12)))]



@pytest.mark.parametrize("small_disk", ["4m"], indirect=True)
def test_a_full_disk_is_a_store_write_error_naming_the_segment_and_leaves_no_temporary(small_disk):
    store = Store(small_disk / "store")
    rows = _images(store, 0, [50] * 12, seed=3)  # 600 rows: a 14 KB segment
    fill_disk(small_disk, leave=4096)
    with pytest.raises(StoreWriteError, match=r"cannot write .*\.rows: No space left on device") as got:
        _consolidate(store, rows)
    assert got.value.errno == errno.ENOSPC  # a raw OSError before: the CLI's exit 2, as for bad input
    assert not [p for p in small_disk.rglob("*") if is_temporary(p.name) or p.name.endswith(".rows")]
    (small_disk / "filler").unlink()
    rs, written = _consolidate(store, rows)  # the space is free again: the segment is written
    assert written == 600 and np.array_equal(SegmentRows(store, rs).rows(np.arange(600)),
                                             np.concatenate(list(rows.values())))


def test_a_reader_held_across_a_repair_reads_the_segment_written_again(tmp_path):
    """A serving process's reader opened on the damaged segment: after ``cache verify --repair`` and the rebuild, it
    reads the new file (it used to read the damaged one it held, un-mark the rebuilt index and delete the new file)."""
    store, rows, rs, path = _damaged_store(tmp_path, _flip_row)
    owner = (INDEX.stage, INDEX.key, "bank")
    held = SegmentRows(Store(tmp_path / "store"), rs, owner)  # opened before the repair: holds the damaged file
    (rep,) = [r for r in verify(store, repair=True) if r.stage == "bank_index"]
    assert rep.repaired == 1 and not os.path.exists(path)
    again, written = _consolidate(store, rows)  # the rebuilt index item writes the segment again, then itself
    assert again == rs and written == 25
    store.write_item(INDEX, "bank", {"x": np.zeros(1)}, {"value_rows": {"bank_values": rs.to_attrs()}})
    every = np.concatenate(list(rows.values()))
    np.testing.assert_array_equal(held.rows(np.array([7, 0, 24])), every[[7, 0, 24]])
    np.testing.assert_array_equal(held.rows(np.arange(25)), every)
    assert os.path.exists(path) and Store(tmp_path / "store").complete_items(*INDEX_SET) == {"bank"}
    assert all(r.ok for r in verify(Store(tmp_path / "store")))


INDEX_SET = (INDEX.stage, INDEX.key)
LISTING = StageKey("bank_index", {"bank": "b", "n": 2}, upstream={"bank_values": VALUES.key})


def _segment_names(store: Store) -> set[str]:
    base = store.stage_dir(VALUES.stage, VALUES.key)
    return {os.path.relpath(os.path.join(d, n), base) for d, _, ns in os.walk(f"{base}/rows") for n in ns}


def test_gc_removes_exactly_the_segments_no_complete_index_lists_and_never_those_a_live_index_reads(tmp_path):
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [5, 0, 7, 3, 9, 1], seed=0)
    names, first, count = _registry(rows)
    old, _ = consolidate_values(store, VALUES.stage, VALUES.key, "b", "old-regions", names, first, count, names)
    part, _ = _consolidate(store, rows, present=names[:3])  # an index of the first images: ids 0..11
    rs, _ = _consolidate(store, rows, present=names[3:])  # rebuilt without them: ids 12..24
    store.write_item(LISTING, "bank", {"x": np.zeros(1)}, {"value_rows": {"bank_values": rs.to_attrs()}})
    unlisted = {os.path.relpath(old.path(store, s), store.stage_dir(VALUES.stage, VALUES.key)) for s in old.segments}
    unlisted.add(os.path.relpath(part.path(store, (0, 12)), store.stage_dir(VALUES.stage, VALUES.key)))
    listed = _segment_names(store) - unlisted
    assert len(unlisted) == 2 and len(listed) == 1
    keep = store.stage_sets()
    assert gc(store, keep, stale_after=60).segments == 0  # just written: a writer may be about to list them
    base = store.stage_dir(VALUES.stage, VALUES.key)
    for name in _segment_names(store):
        os.utime(f"{base}/{name}", (0, 0))
    claim = store.leases.claim(*INDEX_SET, ["bank"])  # an index being built on these values: nothing goes
    assert claim.mine and gc(Store(tmp_path / "store"), keep, stale_after=60).segments == 0
    store.leases.release(claim)
    sizes = {n: os.path.getsize(f"{base}/{n}") for n in unlisted}
    dry = gc(Store(tmp_path / "store"), keep, dry_run=True, stale_after=60)
    assert dry.segments == 2 and sorted(dry.paths) == sorted(f"{base}/{n}" for n in unlisted)
    assert dry.nbytes == sum(sizes.values()) and _segment_names(store) == listed | unlisted  # a dry run deletes nothing
    assert sorted((f, n) for _, _, f, n, _ in dry.segment_folders) == [("rows/b/old-regions", 1), ("rows/b/regions", 1)]
    rep = gc(Store(tmp_path / "store"), keep, stale_after=60)
    assert rep.segments == 2 and rep.nbytes == sum(sizes.values()) and _segment_names(store) == listed
    every = np.concatenate(list(rows.values()))
    np.testing.assert_array_equal(SegmentRows(Store(tmp_path / "store"), rs).rows(np.arange(12, 25)), every[12:])
    assert all(r.ok for r in verify(Store(tmp_path / "store")))
    # the index gone from the kept sets: its segments are no longer listed by any kept index
    rep = gc(Store(tmp_path / "store"), [(VALUES.stage, VALUES.key)], stale_after=60)
    assert rep.segments == 1 and _segment_names(store) == set()


def test_gc_keeps_every_segment_while_an_index_it_cannot_read_is_being_built(tmp_path):
    store = Store(tmp_path / "store")
    rows = _images(store, 0, [5, 7], seed=0)
    rs, _ = _consolidate(store, rows)
    os.utime(rs.path(store, (0, 12)), (0, 0))
    claim = store.leases.claim("bank_index", "no-stage-json-yet", ["bank"])  # which values it reads is unknown
    assert gc(store, store.stage_sets(), stale_after=60).segments == 0 and os.path.exists(rs.path(store, (0, 12)))
    store.leases.release(claim)
    assert gc(store, store.stage_sets(), stale_after=60).segments == 1 and not os.path.exists(rs.path(store, (0, 12)))


def test_gc_of_unlisted_segments_on_an_object_store():
    store = Store(f"s3://{shared_server().create_bucket()}/st")
    rows = _images(store, 0, [5, 7], seed=0)
    names, first, count = _registry(rows)
    old, _ = consolidate_values(store, VALUES.stage, VALUES.key, "b", "old-regions", names, first, count, names)
    rs, _ = _consolidate(store, rows)
    store.write_item(LISTING, "bank", {"x": np.zeros(1)}, {"value_rows": {"bank_values": rs.to_attrs()}})
    rep = gc(store, store.stage_sets(), stale_after=-1)  # every file counts as old
    assert rep.segments == 1 and rep.paths == [old.path(store, (0, 12))]
    assert not store.backend.exists(old.path(store, (0, 12))) and store.backend.exists(rs.path(store, (0, 12)))
    np.testing.assert_array_equal(SegmentRows(store, rs).rows(np.arange(12)), np.concatenate(list(rows.values())))
