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


_BUFFER_BYTES = 4 << 20  # bytes kept in memory before a write to the temporary (a large write goes straight through)


class StoreTemporary:
    """A file written for the store path ``path`` in a temporary file, then moved into place whole (``commit``).

    The temporary is ``Backend.tmp_path_for(path)``. Every failure to create, write, flush or sync it (a full
    disk, a quota, a read-only file system) raises ``StoreWriteError`` naming ``path``; as a context manager it
    is removed on any exception, and ``commit`` removes it when the move fails: none is left behind. File-like
    for ``zipfile`` (``write``, ``tell``, ``seek``, ``flush``; no ``fileno``: ``commit`` syncs).

    Writes are gathered in memory (up to ``_BUFFER_BYTES``; a larger block is written at once) and seeks and
    tells are answered there: a pack's members cost no system call each (zipfile seeks back to every member's
    local header to write its CRC). ``flush`` writes what is gathered to the temporary (a kill then leaves it
    there, as with any buffered file); the bytes of the file are the same as written straight through."""

    def __init__(self, backend: Backend, path: str):
        self.backend, self.path = backend, path
        try:
            self.tmp = backend.tmp_path_for(path)
            self._f = open(self.tmp, "w+b", buffering=0)
        except OSError as e:
            raise write_error(e, path) from e
        self._buf = bytearray()  # the file's bytes from offset _base on, not yet written to the temporary
        self._base = 0  # the temporary holds the bytes before _base, and its position is _base
        self._pos = 0  # the writer's position

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:  # a buffered file writes on write, flush, seek and tell
            raise write_error(e, self.path) from e

    def write(self, data: Any) -> int:
        n = len(mv := memoryview(data).cast("B"))
        at = self._pos - self._base
        if at < 0:  # before the buffer (not done by zipfile, pyarrow or the row writers): written through
            self._drain()
            self._call(self._write_at, self._pos, mv)
            self._pos += n
            if self._pos > self._base:
                self._base = self._call(self._f.seek, self._pos)
            return n
        if at == len(self._buf):
            if not self._buf and n >= _BUFFER_BYTES:  # a large block goes straight to the file
                self._call(self._write_at, self._base, mv)
                self._base = self._pos = self._base + n
                return n
            self._buf += mv
        else:  # zipfile's rewrite of a member's local header, once the member's CRC is known
            if at > len(self._buf):
                self._buf += bytes(at - len(self._buf))
            self._buf[at : at + n] = mv
        self._pos += n
        if len(self._buf) >= _BUFFER_BYTES:
            self._drain()
        return n

    def _write_at(self, offset: int, data: memoryview) -> None:
        if offset != self._base:
            self._f.seek(offset)
        while data:
            data = data[self._f.write(data):]
        if offset != self._base:
            self._f.seek(self._base)

    def _drain(self) -> None:
        """Write the buffered bytes to the temporary (its position then is the end of them)."""
        if self._buf:
            self._call(self._write_at, self._base, memoryview(self._buf))
            self._base += len(self._buf)
            self._buf = bytearray()

    def flush(self) -> None:
        self._drain()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        end = self._base + len(self._buf)
        pos = offset if whence == os.SEEK_SET else offset + (self._pos if whence == os.SEEK_CUR else end)
        if pos < 0:
            raise ValueError(f"negative seek position {pos} in {self.path}")
        self._pos = pos
        return pos

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
