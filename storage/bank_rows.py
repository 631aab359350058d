"""A built bank's value store in region-id order: row segments read by positioned reads of the asked rows only.

A built bank's values are per-image ``bank_values`` items (packed 64 to a pack); reading a retrieval's K x R
scattered rows from them costs a completion record and a checked item read per image hit (~470 ms per image at
200k regions, docs/banks.md section 6). The ``bank_index`` item consolidates each value store (main and DMCE's
auxiliary) once into **segments** in region-id order, as ``ovseg bank import`` writes one row file:

Layout (in the ``bank_values`` output set's folder, so the rows live and die with the items they copy)::

    rows/<bank>/<regions key>/<first id>-<end id>.rows   rows first .. end - 1: (end - first, D) float16, C order,
                                                         then their CRC-32s ((end - first,) little-endian uint32)

- **Append-only, like the registry**: region ids never change as the bank grows, so a segment once written is
  right forever; a grown bank reuses its segments and writes one more for the new ids only.
- **Merged as the bank grows** (``merge_plan``): a segment holding at most twice the rows of the one after it is
  written again together with it (from the segments, each row checked against its CRC-32), so each segment holds
  more than twice the rows of the next: at most log2(rows) + 1 segments per run of ids (one open file each in a
  serving process), whatever the growth pattern. The price is copying: grown by 10 % a night a bank has 1-3
  segments and its merges write 2.4x its rows over 10 nights; by 1 % a night, 3 segments and ~5x over a year.
  The segments merged away stay until ``cache gc`` finds no kept index listing them.
- **Atomic**: each segment is written whole to a temporary, fsynced and moved into place (uploaded whole on an
  object store); a kill leaves a temporary (``cache gc`` removes it) and the rerun writes that segment again. A
  segment in place with the expected size counts as written. ``cache gc`` removes the segments no kept complete
  index item lists (``storage.maintenance._gc_segments``: older than the lease TTL, none a live index may read).
- **Checked**: every row a reader returns is checked against its CRC-32; a damaged or missing segment un-marks
  the ``bank_index`` item that lists it and is removed, so the next run writes it again. ``cache verify`` checks
  every segment of every index item (``verify_segments``; ``--repair`` un-marks and removes likewise). A reader
  whose segment was replaced since it opened it (a repair, then a rebuild) reads the new file once more before it
  calls a mismatch damage.

Ids of registry images no longer in the bank (never indexed, never retrieved) are gaps between segments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from storage.fsio import Entry, is_temporary
from storage.fstemp import StoreTemporary
from storage.reading import DamagedOutputError
from storage.row_files import ROWS, adjacent_runs, not_replaced, row_crcs
from storage.store import Store

log = logging.getLogger("ovseg.storage")

SUFFIX = ".rows"
_DTYPE = np.dtype("float16")
_CRC = np.dtype("<u4")
_VERIFY_ROWS = 65536  # rows per read when ``verify_segments`` checks a segment
_READ_IMAGES = 256  # images read per request while a segment is written (one ranged read per pack)
_MERGE_ROWS = 16384  # rows per read of a segment being merged (32 MiB at D = 1024)


@dataclass(frozen=True)
class RowSegments:
    """Where one value store of a bank lies in region-id order (recorded in the ``bank_index`` item's attrs)."""

    stage: str  # the value store's output set: "bank_values"
    key: str  # its key
    bank: str  # the bank (a registry: region ids)
    regions_key: str  # the registry's region source (``sam_masks`` key)
    dim: int  # D
    segments: tuple[tuple[int, int], ...]  # (first id, end id) per segment, ascending, disjoint

    def to_attrs(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "bank": self.bank, "regions_key": self.regions_key,
                "dim": self.dim, "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_attrs(cls, a: Mapping[str, Any]) -> "RowSegments":
        return cls(a["stage"], a["key"], a["bank"], a["regions_key"], int(a["dim"]),
                   tuple((int(f), int(e)) for f, e in a["segments"]))

    def folder(self, store: Store) -> str:
        return f"{store.stage_dir(self.stage, self.key)}/{ROWS}/{self.bank}/{self.regions_key}"

    def path(self, store: Store, seg: tuple[int, int]) -> str:
        return f"{self.folder(store)}/{seg[0]:012d}-{seg[1]:012d}{SUFFIX}"

    def nbytes(self, seg: tuple[int, int]) -> int:
        """A complete segment's size: its rows and their CRCs."""
        return (seg[1] - seg[0]) * (self.dim * _DTYPE.itemsize + _CRC.itemsize)


def segment_folders(store: Store, stage: str, key: str) -> list[str]:
    """The segment folders of an output set (where ``cache gc`` looks for temporaries of killed writers)."""
    base = f"{store.stage_dir(stage, key)}/{ROWS}"
    return [f"{base}/{b}/{r}" for b in store.backend.subfolders(base) for r in store.backend.subfolders(f"{base}/{b}")]


def segment_files(store: Store, stage: str, key: str) -> list[tuple[str, Entry]]:
    """Every complete-looking segment file of an output set: ``(folder, entry)`` (``cache gc``)."""
    return [(folder, e) for folder in segment_folders(store, stage, key) for e in store.backend.list_entries(folder)
            if not is_temporary(e.name) and e.name.endswith(SUFFIX)]


def listed_segments(store: Store, attrs: Mapping[str, Any]) -> set[str]:
    """The paths of the segments an index item's attrs list (``value_rows``; none for an imported bank)."""
    out = set()
    for a in (attrs.get("value_rows") or {}).values():
        rs = RowSegments.from_attrs(a)
        out.update(rs.path(store, seg) for seg in rs.segments)
    return out


def _present_runs(images: Sequence[str], first: Sequence[int], count: Sequence[int], present: set[str]
                  ) -> list[tuple[int, int]]:
    """``[(first id, end id)]``: the registry's id ranges of the images in ``present``, adjacent ones merged."""
    runs: list[list[int]] = []
    for iid, f, c in zip(images, first, count):
        if iid not in present or c == 0:
            continue
        if runs and runs[-1][1] == f:
            runs[-1][1] = f + c
        else:
            runs.append([f, f + c])
    return [(a, b) for a, b in runs]


def _existing(store: Store, rs: RowSegments) -> dict[int, list[tuple[int, int]]]:
    """Complete segments in place: ``{first id: [(end id, size)]}``."""
    out: dict[int, list[tuple[int, int]]] = {}
    for e in store.backend.list_entries(rs.folder(store)):
        if is_temporary(e.name) or not e.name.endswith(SUFFIX):
            continue
        a, _, b = e.name[: -len(SUFFIX)].partition("-")
        if a.isdigit() and b.isdigit():
            out.setdefault(int(a), []).append((int(b), e.size))
    return out


def _write_segment(store: Store, rs: RowSegments, seg: tuple[int, int], blocks: Iterable[np.ndarray]) -> None:
    """Stream ``(n, D) float16`` blocks (rows ``seg``, in order) into the segment, atomically."""
    path = rs.path(store, seg)
    crcs, n = [], 0
    with StoreTemporary(store.backend, path) as f:  # a full disk: StoreWriteError, no temporary left
        for rows in blocks:
            if rows.dtype != _DTYPE or rows.ndim != 2 or rows.shape[1] != rs.dim:
                raise ValueError(f"{path}: rows must be (n, {rs.dim}) float16, got {rows.dtype} {rows.shape}")
            f.write(np.ascontiguousarray(rows).tobytes())
            crcs.append(row_crcs(rows))
            n += rows.shape[0]
        if n != seg[1] - seg[0]:
            raise ValueError(f"{path}: {n} rows for ids {seg[0]}..{seg[1] - 1}")
        f.write(np.concatenate(crcs).astype(_CRC).tobytes() if crcs else b"")
        f.commit()


def _image_rows(store: Store, stage: str, key: str, images: Sequence[str], array: str) -> Iterable[np.ndarray]:
    """The ``array`` of each image's item, in order (``_READ_IMAGES`` items per request)."""
    for i in range(0, len(images), _READ_IMAGES):
        batch = images[i: i + _READ_IMAGES]
        got = store.read_items(stage, key, batch, [array])
        for iid in batch:
            if isinstance(got[iid], Exception):
                raise got[iid]
            yield got[iid][array]


def merge_plan(pieces: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The segments of one run of adjacent ids, from its pieces in id order (segments in place, then the new ids):
    each segment is a list of adjacent pieces. A segment holding at most twice the rows of the one after it is merged
    with it, repeatedly, so each segment holds more than twice the rows of the next: at most log2(rows) + 1
    segments per run."""
    out: list[list[tuple[int, int]]] = []
    for piece in pieces:
        out.append([piece])
        while len(out) >= 2 and _rows_in(out[-2]) <= 2 * _rows_in(out[-1]):
            last = out.pop()
            out[-1] = out[-1] + last
    return out


def _rows_in(pieces: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in pieces)


class _MergeSourceDamaged(Exception):
    """A segment read to be merged is damaged (it was removed: its rows are written again from the items)."""


def _segment_blocks(store: Store, rs: RowSegments, seg: tuple[int, int]) -> Iterable[np.ndarray]:
    """The rows of a segment in place, in blocks, each row checked against its CRC-32 (a merge's source)."""
    try:
        reader = SegmentRows(store, replace(rs, segments=(seg,)))
        for lo in range(seg[0], seg[1], _MERGE_ROWS):
            yield reader._read(0, lo, min(_MERGE_ROWS, seg[1] - lo))
    except DamagedOutputError as e:
        store.backend.delete(rs.path(store, seg))
        raise _MergeSourceDamaged(str(e)) from e


def consolidate_values(store: Store, stage: str, key: str, bank: str, regions_key: str, images: Sequence[str],
                       first: Sequence[int], count: Sequence[int], present: Iterable[str], array: str = "values"
                       ) -> tuple[RowSegments, int]:
    """The value store ``(stage, key)`` of the registry's ``present`` images in region-id order; ``(segments, rows
    written)``. Segments already in place are reused; the ids they lack are written (one new piece per run of ids:
    a grown bank appends its new regions' rows), and pieces are merged as ``merge_plan`` says. A damaged segment
    read for a merge is removed and its rows written again from the per-image items."""
    present = set(present)
    todo = [(i, f, c) for i, f, c in zip(images, first, count) if i in present and c > 0]
    dim = int(next(_image_rows(store, stage, key, [todo[0][0]], array)).shape[1]) if todo else 0
    rs = RowSegments(stage, key, bank, regions_key, dim, ())
    for _ in range(3):
        try:
            segments, written = _consolidate_runs(store, rs, images, first, count, present, todo, array)
            return replace(rs, segments=tuple(segments)), written
        except _MergeSourceDamaged as e:
            log.warning("%s; writing its rows again from the bank's items", e)
    raise DamagedOutputError(f"{rs.folder(store)}: segments read for a merge were damaged three times in a row")


def _consolidate_runs(store: Store, rs: RowSegments, images: Sequence[str], first: Sequence[int],
                      count: Sequence[int], present: set[str], todo: Sequence[tuple[str, int, int]], array: str
                      ) -> tuple[list[tuple[int, int]], int]:
    existing = _existing(store, rs)

    def in_place(seg: tuple[int, int]) -> bool:
        return any(end == seg[1] and size == rs.nbytes(seg) for end, size in existing.get(seg[0], []))

    def blocks(pieces: Sequence[tuple[int, int]]) -> Iterable[np.ndarray]:
        for piece in pieces:
            if in_place(piece):
                yield from _segment_blocks(store, rs, piece)
            else:
                names = [i for i, f, _ in todo if piece[0] <= f < piece[1]]
                yield from _image_rows(store, rs.stage, rs.key, names, array)

    segments, written = [], 0
    for lo, hi in _present_runs(images, first, count, present):
        pieces, cur = [], lo
        while cur < hi:
            done = [end for end, size in existing.get(cur, []) if end <= hi and size == rs.nbytes((cur, end))]
            end = max(done) if done else hi
            pieces.append((cur, end))
            cur = end
        for group in merge_plan(pieces):
            seg = (group[0][0], group[-1][1])
            if not in_place(seg):
                _write_segment(store, rs, seg, blocks(group))
                written += seg[1] - seg[0]
            segments.append(seg)
    return segments, written


class SegmentRows:
    """``RowReader`` over a bank's row segments: adjacent asked ids in one positioned read (``os.pread`` on a local
    store, a ranged GET on an object store), each row checked against its CRC-32. Holds the CRCs (4 bytes a row)
    and, on a local store, one open file descriptor per segment.

    ``owner``: ``(stage, key, item)`` listing these segments (the ``bank_index`` item); a damaged segment un-marks it
    and is removed, so the next run writes both again.
    """

    def __init__(self, store: Store, rs: RowSegments, owner: tuple[str, str, str] | None = None):
        self.store, self.rs, self.owner = store, rs, owner
        self.dim, self.dtype = rs.dim, _DTYPE
        self.first = np.array([s[0] for s in rs.segments], np.int64)
        self.end = np.array([s[1] for s in rs.segments], np.int64)
        self.n_rows = int(self.end[-1]) if self.end.size else 0
        self.paths = [rs.path(store, s) for s in rs.segments]
        self._row_bytes = self.dim * _DTYPE.itemsize
        self._fds: list[int | None] = [None] * len(self.paths)
        self._retired: list[int] = []  # descriptors of replaced files: closed with the reader (a thread may read one)
        self.crc: list[np.ndarray] = [np.empty(0, _CRC)] * len(self.paths)
        for s in range(len(self.paths)):
            self._open(s)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", []) + getattr(self, "_retired", []):
            if fd is not None:
                os.close(fd)

    def _open(self, s: int) -> None:
        """(Re)open segment ``s``: its file descriptor (local stores) and its CRCs."""
        path, n = self.paths[s], int(self.end[s] - self.first[s])
        try:
            fd = os.open(path, os.O_RDONLY) if self.store.backend.is_local else None
        except FileNotFoundError:
            self._damaged(path, "missing")
        if self._fds[s] is not None:
            self._retired.append(self._fds[s])
        self._fds[s] = fd
        raw = self._get(s, n * self._row_bytes, n * _CRC.itemsize)
        if len(raw) != n * _CRC.itemsize:
            self._damaged(path, f"{len(raw)} of {n * _CRC.itemsize} CRC bytes")
        self.crc[s] = np.frombuffer(raw, _CRC)

    def _replaced(self, s: int) -> bool:
        """Whether segment ``s`` was written again since it was opened (``cache verify --repair`` removed it and
        a run wrote it again): then it is reopened. Local stores compare the open file with the path's (device,
        inode); an object store's reads always get the current object, so only its CRCs are read again."""
        if not_replaced(self._fds[s], self.paths[s]):
            return False
        self._open(s)
        return True

    def _get(self, s: int, lo: int, size: int) -> bytes:
        fd = self._fds[s]
        try:
            return os.pread(fd, size, lo) if fd is not None else self.store.backend.get_range(self.paths[s], lo, lo + size)
        except FileNotFoundError:
            return b""

    def _damaged(self, path: str, why: str) -> None:
        if self.owner is not None:
            self.store.drop_items(*self.owner[:2], [self.owner[2]], reason=f"damaged value rows: {path}: {why}")
            self.store.backend.delete(path)
        raise DamagedOutputError(f"{path} is damaged ({why}); " + (
            "it was removed and its bank index un-marked: the next `ovseg run` writes both again"
            if self.owner is not None else "`ovseg cache verify --repair` un-marks its bank index"))

    def _read(self, s: int, first: int, count: int, retry: bool = True) -> np.ndarray:
        """Rows ``first .. first + count - 1`` of segment ``s``, checked against their CRCs; read once more from
        the file now at its path when the one held was replaced (a repaired segment)."""
        off = first - int(self.first[s])
        data = self._get(s, off * self._row_bytes, count * self._row_bytes)
        rows = np.frombuffer(data[: len(data) - len(data) % self._row_bytes], _DTYPE).reshape(-1, self.dim)
        bad = np.flatnonzero(row_crcs(rows) != self.crc[s][off: off + rows.shape[0]])
        if len(data) != count * self._row_bytes or bad.size:
            if retry and self._replaced(s):
                return self._read(s, first, count, retry=False)
            self._damaged(self.paths[s], f"rows {first}..{first + count - 1}: read {len(data)} bytes"
                          if not bad.size else f"row {first + int(bad[0])} does not match its CRC-32")
        return rows

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        uniq, inverse = np.unique(ids, return_inverse=True)
        seg = np.searchsorted(self.first, uniq, side="right") - 1
        if ids.ndim != 1 or (uniq.size and ((seg < 0).any() or (uniq >= self.end[np.maximum(seg, 0)]).any())):
            raise ValueError(f"row ids must be a 1-D array of the bank's ids ({len(self.paths)} segments up to "
                             f"{self.n_rows - 1}; ids of images no longer in the bank are not stored)")
        out = np.empty((uniq.size, self.dim), dtype=_DTYPE)
        for a, b in adjacent_runs(uniq, seg):
            out[a:b] = self._read(int(seg[a]), int(uniq[a]), b - a)
        return out[inverse]


def verify_segments(store: Store, attrs: Mapping[str, Any], remove: bool = False, checksums: bool = True) -> None:
    """Check every segment of every value store an index item's attrs list (``value_rows``): its size, and with
    ``checksums`` every row against its CRC-32 (``cache verify``); raises ``DamagedOutputError`` naming the segment,
    which ``remove`` (``--repair``) deletes so that the run that rebuilds the un-marked item writes it again."""
    for a in (attrs.get("value_rows") or {}).values():
        rs = RowSegments.from_attrs(a)
        for seg in rs.segments:
            path = rs.path(store, seg)
            try:
                size = store.backend.size(path)
                if not checksums and size != rs.nbytes(seg):
                    raise DamagedOutputError(f"{path} is damaged ({size} bytes, a complete segment has "
                                             f"{rs.nbytes(seg)})")
                if checksums:
                    reader = SegmentRows(store, replace(rs, segments=(seg,)))
                    for lo in range(seg[0], seg[1], _VERIFY_ROWS):
                        reader._read(0, lo, min(_VERIFY_ROWS, seg[1] - lo))
            except DamagedOutputError:
                if remove:
                    store.backend.delete(path)
                raise
