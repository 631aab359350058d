"""A store file written through a temporary file (``StoreTemporary``): the one write path of files written in pieces.

Packs (``storage.writing.PackSession``), row files (``storage.row_files.write_row_file``) and the backend's own
small files (``Backend.put_atomic`` / ``put_if_absent``) are written this way, so a full disk, a quota or a
read-only file system is a ``StoreWriteError`` naming the store path (``ovseg`` exits 4) and never leaves a
partial temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from storage.fserrors import write_error

if TYPE_CHECKING:
    from storage.fsio import Backend


class StoreTemporary:
    """A file written for the store path ``path`` in a temporary file, then moved into place whole (``commit``).

    The temporary is ``Backend.tmp_path_for(path)``. Every failure to create, write, flush or sync it (a full
    disk, a quota, a read-only file system) raises ``StoreWriteError`` naming ``path``; as a context manager it
    is removed on any exception, and ``commit`` removes it when the move fails: none is left behind. File-like
    for ``zipfile`` (``write``, ``tell``, ``seek``, ``flush``; no ``fileno``: ``commit`` syncs)."""

    def __init__(self, backend: Backend, path: str):
        self.backend, self.path = backend, path
        try:
            self.tmp = backend.tmp_path_for(path)
            self._f = open(self.tmp, "w+b")
        except OSError as e:
            raise write_error(e, path) from e

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:  # a buffered file writes on write, flush, seek and tell
            raise write_error(e, self.path) from e

    def write(self, data: bytes) -> int:
        return self._call(self._f.write, data)

    def flush(self) -> None:
        self._call(self._f.flush)

    def tell(self) -> int:
        return self._call(self._f.tell)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self._f.seek, offset, whence)

    def seekable(self) -> bool:
        return True

    def close(self, sync: bool = True) -> None:
        """Flush, sync (unless ``sync`` is False: lease files) and close the temporary file (it stays, for
        ``commit`` or ``Backend.put_if_absent``)."""
        if not self._f.closed:
            self.flush()
            if sync:
                self._call(os.fsync, self._f.fileno())
            self._call(self._f.close)

    def commit(self) -> int:
        """Close the file and move it to ``path`` (``Backend.put_file``); returns its size in bytes."""
        try:
            self.close()
            size = os.path.getsize(self.tmp)
            self.backend.put_file(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return size

    def discard(self) -> None:
        """Close and remove the temporary file (nothing of it reaches the store)."""
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self) -> "StoreTemporary":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.discard()
