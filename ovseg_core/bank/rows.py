"""Row readers: the only way retrieval reads a bank's value (or key) store.

A serving process reads the K x R rows it retrieved for an image and nothing else: a
:class:`RowReader` maps region ids to rows of an ``(N, D)`` store that stays on disk (memory
mapped or read with positioned reads); the index is the only bank structure held in RAM. The
storage layer opens the files and hands readers over; nothing here knows a path.

- :class:`ArrayRows`: any array with NumPy fancy indexing on its first axis (``np.ndarray``,
  ``np.memmap``, or an in-RAM tensor's ``.numpy()``: the authors' load-everything approach).
- :class:`NpyRows`: a memory-mapped ``.npy`` file (or raw rows at an offset). The pages an image
  touches (and cached neighbours, see below) stay mapped as shared, reclaimable page cache; they
  count in the process's RSS (``RssFile``) until the kernel drops them.
- :class:`PreadRows`: the same file read with ``os.preadv`` (nothing mapped: the process's RSS
  does not grow with the rows read; one system call per run of adjacent rows). The serving
  default: measured faster than the mapping too (no page faults), see ``docs/banks.md``.
"""

from __future__ import annotations

import mmap
import os
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np

__all__ = ["ArrayRows", "NpyRows", "PreadRows", "RowReader", "npy_header"]


@runtime_checkable
class RowReader(Protocol):
    """Rows of an ``(n_rows, dim)`` store by id."""

    n_rows: int
    dim: int
    dtype: np.dtype

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """``(len(ids), dim)`` rows in the order of ``ids`` (int64, each in 0..n_rows-1)."""
        ...


def _check_ids(ids: np.ndarray, n_rows: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"row ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise ValueError(f"row ids must lie in 0..{n_rows - 1}, got {ids.min()}..{ids.max()}")
    return ids.astype(np.int64, copy=False)


class ArrayRows:
    """Rows of an in-RAM or memory-mapped ``(N, D)`` array."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 2:
            raise ValueError(f"a row store must be 2-D (N, D), got shape {array.shape}")
        self.array = array
        self.n_rows, self.dim = int(array.shape[0]), int(array.shape[1])
        self.dtype = np.dtype(array.dtype)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, self.n_rows)
        if ids.size == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        uniq, inverse = np.unique(ids, return_inverse=True)  # ascending: sequential access on disk
        return np.asarray(self.array[uniq])[inverse]


def npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of the ``.npy`` file open in ``f`` (C order required).

    Raises:
        ValueError: not a ``.npy`` file, or stored in Fortran order.
    """
    f.seek(0)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version} (1.0 and 2.0 are read)")
        shape, fortran, dtype = readers[version](f)
    except ValueError as e:
        raise ValueError(f"not a readable .npy file: {e}") from e
    if fortran:
        raise ValueError("a row store must be a C-order .npy file, got Fortran order; rewrite it with np.save")
    return tuple(int(s) for s in shape), np.dtype(dtype), f.tell()


def _raw_layout(
    f: BinaryIO, shape: tuple[int, int] | None, dtype: np.dtype | str | None, offset: int | None
) -> tuple[int, int, np.dtype, int]:
    """``(n_rows, dim, dtype, offset)`` from the ``.npy`` header, or the given raw layout."""
    if shape is None:
        npy_shape, npy_dtype, npy_offset = npy_header(f)
        if len(npy_shape) != 2:
            raise ValueError(f"a row store must be 2-D (N, D), got shape {npy_shape}")
        return npy_shape[0], npy_shape[1], npy_dtype, npy_offset
    if dtype is None or offset is None:
        raise ValueError("a raw row file needs shape, dtype and offset together (or none of them for a .npy file)")
    return int(shape[0]), int(shape[1]), np.dtype(dtype), int(offset)


class NpyRows:
    """Memory-mapped rows of a ``.npy`` file, or of raw C-order rows at ``offset`` (``shape`` given).

    The file object must stay open while the reader is used; the mapping is read-only.
    """

    def __init__(
        self,
        f: BinaryIO,
        shape: tuple[int, int] | None = None,
        dtype: np.dtype | str | None = None,
        offset: int | None = None,
    ) -> None:
        self.n_rows, self.dim, self.dtype, off = _raw_layout(f, shape, dtype, offset)
        self._map = np.memmap(f, dtype=self.dtype, mode="r", offset=off, shape=(self.n_rows, self.dim))
        # Random access: no readahead I/O around each touched row. The kernel still maps up to
        # 16 neighbouring pages already in the page cache per fault ("fault-around"), so RSS
        # grows by more than the rows read (2.8 GiB after 200 images of a 2.9M-region bank).
        self._map._mmap.madvise(mmap.MADV_RANDOM)
        self._array_rows = ArrayRows(self._map)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self._array_rows.rows(ids)


class PreadRows:
    """Rows of a ``.npy`` (or raw) file read with ``os.pread``: nothing is mapped or cached here.

    Adjacent ids are read with one call. The file object must stay open while the reader is used.
    """

    def __init__(
        self,
        f: BinaryIO,
        shape: tuple[int, int] | None = None,
        dtype: np.dtype | str | None = None,
        offset: int | None = None,
    ) -> None:
        self.n_rows, self.dim, self.dtype, self._offset = _raw_layout(f, shape, dtype, offset)
        self._fd = f.fileno()
        self._row_bytes = self.dim * self.dtype.itemsize

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, self.n_rows)
        uniq, inverse = np.unique(ids, return_inverse=True)
        out = np.empty((uniq.size, self.dim), dtype=self.dtype)
        if uniq.size:
            starts = np.flatnonzero(np.diff(uniq, prepend=uniq[0] - 2) != 1)  # first id of each run
            ends = np.append(starts[1:], uniq.size)
            flat = out.view(np.uint8).reshape(-1)
            for s, e in zip(starts.tolist(), ends.tolist()):
                want = (e - s) * self._row_bytes
                got = os.preadv(self._fd, [flat[s * self._row_bytes : e * self._row_bytes]],
                                self._offset + int(uniq[s]) * self._row_bytes)
                if got != want:
                    raise ValueError(f"row store is truncated: read {got} of {want} bytes at row {int(uniq[s])}")
        return out[inverse]
