"""File primitives of the store over a local folder or an fsspec URL.

Everything the store writes goes through four operations whose guarantees the rest of
``storage`` relies on:

- ``put_atomic``: readers see the old content or the whole new content, never a part
  (local: a temporary file in the same folder, fsync, ``os.replace``; object stores: one PUT).
- ``put_if_absent``: create a file only if it does not exist, atomically with its content
  (local: ``os.link`` of a complete temporary file, which fails if the name exists; object
  stores: a conditional PUT, ``If-None-Match: *``, where the endpoint supports it).
- ``get`` / ``get_range``: whole or partial reads; a missing file raises ``FileNotFoundError``.
- ``listdir``: the names in one folder (one LIST request on object stores).

Temporary files are named ``.tmp-<host>-<pid>-<random>-<name>``; ``stale_temporaries`` finds
those left by dead writers so ``ovseg cache gc`` can remove them.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_PREFIX = ".tmp-"


class ConditionalWriteUnsupported(RuntimeError):
    """The object store rejected a conditional PUT (``If-None-Match``)."""


def _tmp_name(name: str) -> str:
    return f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"


@dataclass(frozen=True)
class Entry:
    """One file of a listing."""

    name: str
    size: int
    mtime: float


class Backend:
    """A store root on a local path or an fsspec URL.

    Args:
        location: an absolute local path or an fsspec URL (``s3://bucket/prefix``, ``memory://x``).
        storage_options: fsspec options for remote stores (endpoint, credentials).
    """

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None):
        self.location = location
        self.fs, root = fsspec.core.url_to_fs(location, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.conditional_writes = True  # cleared after an endpoint rejects If-None-Match

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, path: str) -> bool:
        return os.path.exists(path) if self.is_local else self.fs.exists(path)

    # ------------------------------------------------------------------ writes
    def put_atomic(self, path: str, data: bytes) -> None:
        """Replace ``path`` with ``data`` so that readers see all or nothing."""
        if self.is_local:
            tmp = self._local_tmp(path, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` unless it exists; True if this call created it."""
        if self.is_local:
            tmp = self._local_tmp(path, data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.conditional_writes:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except (NotImplementedError, TypeError, ValueError) as e:
                self.conditional_writes = False
                raise ConditionalWriteUnsupported(f"{self.location} does not support conditional writes: {e}") from e
        if self.fs.exists(path):  # documented fallback: a check-then-put race remains on such endpoints
            return False
        self.fs.pipe_file(path, data)
        return True

    def put_file(self, local_path: str, path: str) -> None:
        """Move (local) or upload (remote) a complete local file to ``path`` atomically."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(local_path, path)
        else:
            self.fs.put_file(local_path, path)
            os.remove(local_path)

    def tmp_path_for(self, path: str) -> str:
        """A temporary file next to ``path`` (local stores) or in the system temp folder (remote)."""
        name = _tmp_name(path.rsplit("/", 1)[-1])
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return os.path.join(os.path.dirname(path), name)
        import tempfile

        return os.path.join(tempfile.gettempdir(), name)

    def _local_tmp(self, path: str, data: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), _tmp_name(os.path.basename(path)))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    # ------------------------------------------------------------------ reads
    def get(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        return self.fs.cat_file(path)

    def get_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (fewer if the file is shorter)."""
        if self.is_local:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self.fs.cat_file(path, start=start, end=end)

    def size(self, path: str) -> int | None:
        """Size in bytes, or None if the file is missing."""
        try:
            return os.path.getsize(path) if self.is_local else int(self.fs.size(path))
        except (FileNotFoundError, OSError):
            return None

    def listdir(self, folder: str) -> list[str]:
        """Names (not paths) in ``folder``; empty if it does not exist."""
        if self.is_local:
            try:
                return os.listdir(folder)
            except FileNotFoundError:
                return []
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def list_entries(self, folder: str) -> list[Entry]:
        """Files in ``folder`` with size and modification time (seconds since the epoch)."""
        out = []
        if self.is_local:
            try:
                with os.scandir(folder) as it:
                    for d in it:
                        try:
                            st = d.stat()
                        except FileNotFoundError:
                            continue
                        if d.is_file():
                            out.append(Entry(d.name, st.st_size, st.st_mtime))
            except FileNotFoundError:
                pass
            return out
        try:
            infos = self.fs.ls(folder, detail=True, refresh=True)
        except FileNotFoundError:
            return out
        for info in infos:
            if info.get("type") == "directory":
                continue
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append(Entry(info["name"].rstrip("/").rsplit("/", 1)[-1], int(info.get("size") or 0), float(mtime)))
        return out

    def subfolders(self, folder: str) -> list[str]:
        """Names of the sub-folders of ``folder``."""
        if self.is_local:
            try:
                return sorted(d.name for d in os.scandir(folder) if d.is_dir())
            except FileNotFoundError:
                return []
        try:
            return sorted(p["name"].rstrip("/").rsplit("/", 1)[-1]
                          for p in self.fs.ls(folder, detail=True, refresh=True) if p.get("type") == "directory")
        except FileNotFoundError:
            return []

    def walk_files(self, folder: str) -> Iterator[tuple[str, int]]:
        """Every file under ``folder`` (path, size)."""
        if self.is_local:
            for dirpath, _, files in os.walk(folder):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        yield p, os.path.getsize(p)
                    except OSError:
                        continue
            return
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return
        for p, info in found.items():
            yield p, int(info.get("size") or 0)

    # ------------------------------------------------------------------ deletes
    def delete(self, path: str) -> bool:
        """Remove one file; True if it existed."""
        try:
            if self.is_local:
                os.remove(path)
            else:
                self.fs.rm_file(path)
            return True
        except FileNotFoundError:
            return False

    def delete_tree(self, folder: str) -> None:
        if self.is_local:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        elif self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    def mkdirs(self, folder: str) -> None:
        if self.is_local:
            Path(folder).mkdir(parents=True, exist_ok=True)


def is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


def stale_temporaries(backend: Backend, folder: str, older_than: float) -> list[Entry]:
    """Temporary files in ``folder`` not modified for ``older_than`` seconds (their writer is gone)."""
    now = time.time()
    return [e for e in backend.list_entries(folder) if is_temporary(e.name) and now - e.mtime > older_than]
