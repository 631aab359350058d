"""Row files: an imported value store as one contiguous array, read by positioned reads of the asked rows only.

Layout (in the output set's stage folder)::

    rows/values.f16      the store's (N, D) float16 rows, C order, no header (written whole to a temporary,
                         then moved into place)

and one item ``rows`` of the output set: ``crc (N,) uint32``, the CRC-32 of every row, attrs ``rows``, ``dim``,
``dtype``, ``file``. The item is written after the file, so a complete item means a complete file; every row a
reader returns is checked against its CRC (a damaged file un-marks the item: ``ovseg bank import`` writes it
again), and ``cache verify`` checks the whole file (``verify_row_file``); a reader whose file was written again
since it opened it reads the new one (and its item's CRCs) once more before it calls a mismatch damage.

Why not the store's packs (``ovseg bank import`` wrote 1,024-row items before): a pack's array is one compressed
chunk, so one retrieved row costs its whole item (1.5 MB of 768-d rows read, CRC-checked and decompressed);
here it costs its own 1.5 kB (docs/banks.md section 6 has the figures).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from storage.fstemp import StoreTemporary
from storage.keys import StageKey
from storage.reading import DamagedOutputError, MissingOutputError
from storage.store import Store

ROWS = "rows"  # the folder of the row file in its stage folder, and the item holding the CRCs
ROW_FILE = f"{ROWS}/values.f16"
_DTYPE = np.dtype("float16")
_VERIFY_ROWS = 65536  # rows per read when ``verify_row_file`` checks a whole file


def row_file_path(store: Store, stage: str, key: str) -> str:
    return f"{store.stage_dir(stage, key)}/{ROW_FILE}"


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """``(n,) uint32``: the CRC-32 of each row of an ``(n, D)`` array (its C-order bytes)."""
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], rows.shape[1] * rows.dtype.itemsize)
    return np.fromiter((zlib.crc32(r) for r in raw), dtype=np.uint32, count=raw.shape[0])


def write_row_file(store: Store, stage_key: StageKey, chunks: Iterable[np.ndarray],
                   attrs: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Stream ``(n, D) float16`` row chunks into the output set's row file, then its ``rows`` item; ``(N, D)``.

    Only one chunk is in memory at a time (and the CRCs, 4 bytes a row). A kill before the item leaves a
    temporary file and no complete output (``ovseg bank import`` removes it under its lease, as ``cache gc`` does).
    """
    path = row_file_path(store, stage_key.stage, stage_key.key)
    crcs, n, dim = [], 0, 0
    with StoreTemporary(store.backend, path) as f:  # a full disk: StoreWriteError, no temporary left
        for chunk in chunks:
            if chunk.dtype != _DTYPE or chunk.ndim != 2:
                raise ValueError(f"row chunks must be (n, D) float16, got {chunk.dtype} {chunk.shape}")
            f.write(np.ascontiguousarray(chunk).tobytes())
            crcs.append(row_crcs(chunk))
            n, dim = n + chunk.shape[0], chunk.shape[1]
        f.commit()
    crc = np.concatenate(crcs) if crcs else np.empty(0, np.uint32)
    store.write_item(stage_key, ROWS, {"crc": crc},
                     {**dict(attrs or {}), "rows": n, "dim": dim, "dtype": _DTYPE.name, "file": ROW_FILE})
    return n, dim


def adjacent_runs(uniq: np.ndarray, breaks: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``[(start, end)]`` positions of the runs of adjacent ids in ascending unique ids ``(n,) int64``; a run also
    ends before every position where ``breaks`` (``(n,) int64``, e.g. the file each id is in) changes."""
    if not uniq.size:
        return []
    cut = np.diff(uniq, prepend=uniq[0] - 2) != 1
    if breaks is not None:
        cut |= np.diff(breaks, prepend=breaks[0] - 1) != 0
    starts = np.flatnonzero(cut)
    return list(zip(starts.tolist(), np.append(starts[1:], uniq.size).tolist()))


def not_replaced(fd: int | None, path: str) -> bool:
    """Whether a reader holding ``fd`` (opened from ``path`` on a local store) has nothing new to read there: the
    path is gone, or still names the held file (same device and inode). ``fd`` None (an object store, whose reads
    always get the current object): False."""
    if fd is None:
        return False
    try:
        now, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


class FileRows:
    """``RowReader`` over a row file: adjacent asked ids in one positioned read (``os.pread`` on a local store, a
    ranged GET on an object store), each row checked against its CRC-32. Holds the CRCs (4 bytes a row) and, on
    a local store, one open file descriptor."""

    def __init__(self, store: Store, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.path = row_file_path(store, stage, key)
        self._fd: int | None = None
        self._retired: list[int] = []  # descriptors of replaced files: closed with the reader (a thread may read one)
        self._open()

    def __del__(self) -> None:
        for fd in [getattr(self, "_fd", None)] + getattr(self, "_retired", []):
            if fd is not None:
                os.close(fd)

    def _open(self) -> None:
        """(Re)read the ``rows`` item (the CRCs, N, D) and (re)open the file (local stores)."""
        attrs = self.store.item_attrs(self.stage, self.key, ROWS)
        self.crc = self.store.read_item(self.stage, self.key, ROWS, ["crc"])["crc"]
        self.n_rows, self.dim, self.dtype = int(attrs["rows"]), int(attrs["dim"]), np.dtype(attrs["dtype"])
        self._row_bytes = self.dim * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY) if self.store.backend.is_local else None
        if self._fd is not None:
            self._retired.append(self._fd)
        self._fd = fd

    def _replaced(self) -> bool:
        """Whether the row file was written again since it was opened (``ovseg bank import`` after a damage):
        then it and its ``rows`` item are read again. Local stores compare the open file with the path's (device,
        inode); an object store's reads always get the current object, so only the item is read again."""
        if not_replaced(self._fd, self.path):
            return False
        try:
            self.store.state(self.stage, self.key)  # the item's new record: listed again
            self._open()
        except (FileNotFoundError, MissingOutputError):  # not imported again (yet); a damaged item included
            return False
        return True

    def _read(self, first: int, count: int, drop: bool = True, retry: bool = True) -> np.ndarray:
        """Rows ``first .. first + count - 1``, checked (read once more from the file now at its path when the
        one held was replaced); raises ``DamagedOutputError`` (the item un-marked when ``drop``)."""
        lo, size = first * self._row_bytes, count * self._row_bytes
        try:
            data = os.pread(self._fd, size, lo) if self._fd is not None else self.store.backend.get_range(
                self.path, lo, lo + size)
        except FileNotFoundError:
            data = b""
        rows = np.frombuffer(data[: len(data) - len(data) % self._row_bytes], dtype=self.dtype).reshape(-1, self.dim)
        bad = np.flatnonzero(row_crcs(rows) != self.crc[first : first + rows.shape[0]])
        if len(data) != size or bad.size:
            if retry and self._replaced():
                return self._read(first, count, drop, retry=False)
            why = (f"rows {first}..{first + count - 1}: read {len(data)} of {size} bytes" if len(data) != size
                   else f"row {first + int(bad[0])} does not match its CRC-32")
            if drop:
                self.store.drop_items(self.stage, self.key, [ROWS], reason=f"damaged row file: {why}")
            raise DamagedOutputError(f"{self.path} is damaged ({why}); " + (
                "it was un-marked: run `ovseg bank import` again to write it" if drop else
                "`ovseg cache verify --repair` un-marks it, then `ovseg bank import` writes it again"))
        return rows

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= self.n_rows)):
            raise ValueError(f"row ids must be a 1-D array in 0..{self.n_rows - 1}")
        uniq, inverse = np.unique(ids, return_inverse=True)  # ascending: runs of adjacent ids read at once
        out = np.empty((uniq.size, self.dim), dtype=self.dtype)
        for s, e in adjacent_runs(uniq):
            out[s:e] = self._read(int(uniq[s]), e - s)
        return out[inverse]


def verify_row_file(store: Store, stage: str, key: str) -> None:
    """Check every row of an output set's row file against its CRC-32 (``cache verify``); raises
    ``DamagedOutputError`` (nothing un-marked) when the file is missing or short or a row differs."""
    try:
        rows = FileRows(store, stage, key)
    except FileNotFoundError as e:
        raise DamagedOutputError(f"{row_file_path(store, stage, key)} is missing") from e
    for first in range(0, rows.n_rows, _VERIFY_ROWS):
        rows._read(first, min(_VERIFY_ROWS, rows.n_rows - first), drop=False)
