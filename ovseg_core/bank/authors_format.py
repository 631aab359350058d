"""The authors' prebuilt bank files, read without holding a store in RAM.

- ``{bank}_{encoder}.pt`` (values, e.g. ``coco_metaclip_l.pt``) and ``{bank}_{vfm}.pt`` (keys):
  one ``torch.save``d ``[N, D]`` fp16 tensor, row = region id (``pt_store.py`` ``finalize``).
  ``torch.save`` writes a ZIP archive whose tensor bytes are one **stored** (uncompressed) record
  ``<name>/data/<key>``; :func:`read_pt_layout` reads the pickle with ``torch.load(...,
  weights_only=True, map_location="meta")`` (shape, dtype and strides, no tensor bytes) and
  finds that record's offset, and :func:`iter_pt_rows` streams row chunks with positioned reads.
  ``torch.load(path, mmap=True, weights_only=True)`` gives the same rows as a lazy mapped tensor
  (it needs a path; the rows it touches count in RSS as page cache).
- ``{bank}_{vfm}.faiss``: ``faiss.write_index`` of an ``IndexIDMap2(IndexIVFPQ)`` whose
  ``id_map`` holds the region ids (:func:`ovseg_core.bank.index.index_from_file`);
  :func:`check_id_coverage` checks it indexes every store row exactly once.

Storage opens the files; everything here takes open binary file objects.
"""

from __future__ import annotations

import pickle
import struct
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["IdCoverage", "PtLayout", "check_id_coverage", "check_pt_layout", "iter_pt_rows", "read_pt_layout"]

# Local ZIP file header: signature, fixed part size, offsets of the name and extra-field lengths.
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE = 0x04034B50
_TORCH_TO_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.bfloat16: None}


@dataclass(frozen=True)
class PtLayout:
    """Where the rows of a ``torch.save``d 2-D tensor lie in its file."""

    rows: int  # N
    dim: int  # D
    dtype: np.dtype  # element type (float16 for the authors' stores)
    offset: int  # byte offset of row 0 in the file
    record: str  # the ZIP record holding the tensor bytes


def _fail(msg: str) -> ValueError:
    return ValueError(f"not an authors' bank store ({msg}); expected a torch.save'd [N, D] fp16 tensor")


def read_pt_layout(f: BinaryIO) -> PtLayout:
    """Shape, dtype and data offset of the ``[N, D]`` tensor saved in the file ``f``.

    Only the archive's directory and its small pickle are read (``weights_only=True``).

    Raises:
        ValueError: not a ZIP-format ``torch.save`` file, not one contiguous 2-D tensor, a
            compressed or byte-swapped record, or a truncated file.
    """
    try:
        f.seek(0)
        archive = zipfile.ZipFile(f)  # first: a legacy (non-ZIP) torch.save file would be loaded whole
        f.seek(0)
        meta = torch.load(f, weights_only=True, map_location="meta")
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise _fail(f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, torch.Tensor) or meta.ndim != 2:
        got = tuple(meta.shape) if isinstance(meta, torch.Tensor) else type(meta).__name__
        raise _fail(f"the file holds {got}")
    if not meta.is_contiguous() or meta.storage_offset() != 0:
        raise _fail("the tensor is a strided view of its storage")
    np_dtype = _TORCH_TO_NUMPY.get(meta.dtype)
    if np_dtype is None:
        raise _fail(f"dtype {meta.dtype}")
    names = archive.namelist()
    records = [n for n in names if "/data/" in n and not n.split("/data/", 1)[1].startswith(".")]
    byteorder = [n for n in names if n.endswith("/byteorder")]
    if byteorder and archive.read(byteorder[0]).decode() != sys.byteorder:
        raise _fail(f"byte order {archive.read(byteorder[0]).decode()!r} differs from this machine's")
    if len(records) != 1:
        raise _fail(f"{len(records)} tensor records")
    info = archive.getinfo(records[0])
    nbytes = meta.numel() * meta.element_size()
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
        raise _fail(f"record {records[0]} is compressed or holds {info.file_size} < {nbytes} bytes")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _LOCAL_SIGNATURE:
        raise _fail("damaged local ZIP header")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[9:11]
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    f.seek(0, 2)
    if f.tell() < offset + nbytes:
        raise _fail(f"the file is truncated: {f.tell()} bytes, the tensor ends at {offset + nbytes}")
    return PtLayout(int(meta.shape[0]), int(meta.shape[1]), np.dtype(np_dtype), offset, records[0])


def check_pt_layout(layout: PtLayout, rows: int | None = None, dim: int | None = None, dtype: str = "float16") -> None:
    """Raise ``ValueError`` unless the store has the expected row count, dimension and dtype.

    Args:
        rows: expected N (the index's id range, the registry's size), or None.
        dim: expected D (the encoder's output dim: 512 for ViT-B CLIPs, 768 for ViT-L, 1024 for keys).
        dtype: expected element type (the authors' stores: float16).
    """
    problems = []
    if rows is not None and layout.rows != rows:
        problems.append(f"{layout.rows} rows, expected {rows}")
    if dim is not None and layout.dim != dim:
        problems.append(f"dimension {layout.dim}, expected {dim}")
    if layout.dtype != np.dtype(dtype):
        problems.append(f"dtype {layout.dtype}, expected {dtype}")
    if problems:
        raise ValueError(f"bank store {layout.record}: " + "; ".join(problems))


def iter_pt_rows(f: BinaryIO, layout: PtLayout, chunk_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_row, rows)`` chunks of ``(<= chunk_rows, D)`` rows in order.

    Reads ``chunk_rows * D * itemsize`` bytes at a time (64 MiB for 1024-d fp16 keys); nothing
    else of the store is held.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    row_bytes = layout.dim * layout.dtype.itemsize
    for start in range(0, layout.rows, chunk_rows):
        n = min(chunk_rows, layout.rows - start)
        f.seek(layout.offset + start * row_bytes)
        buf = f.read(n * row_bytes)
        if len(buf) != n * row_bytes:
            raise ValueError(f"bank store truncated at row {start}: read {len(buf)} of {n * row_bytes} bytes")
        yield start, np.frombuffer(buf, dtype=layout.dtype).reshape(n, layout.dim)


@dataclass(frozen=True)
class IdCoverage:
    """How an index's ids cover the rows 0..N-1 of its stores."""

    indexed: int  # vectors in the index
    missing: int  # store rows the index never returns
    duplicated: int  # ids stored more than once
    out_of_range: int  # ids < 0 or >= N

    @property
    def complete(self) -> bool:
        """Every row indexed exactly once, nothing else."""
        return self.missing == 0 and self.duplicated == 0 and self.out_of_range == 0


def check_id_coverage(ids: np.ndarray, n_rows: int) -> IdCoverage:
    """Compare an index's ``id_map`` (``BankIndex.ids()``) with a store of ``n_rows`` rows."""
    ids = np.asarray(ids, dtype=np.int64)
    in_range = ids[(ids >= 0) & (ids < n_rows)]
    counts = np.bincount(in_range, minlength=n_rows)
    return IdCoverage(
        indexed=int(ids.size),
        missing=int((counts == 0).sum()),
        duplicated=int((counts > 1).sum()),
        out_of_range=int(ids.size - in_range.size),
    )
