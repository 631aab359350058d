"""File primitives of the store over a local folder or an fsspec URL.

Everything the store writes goes through four operations whose guarantees the rest of
``storage`` relies on:

- ``put_atomic``: readers see the old content or the whole new content, never a part
  (local: a temporary file in the same folder, fsync, ``os.replace``; object stores: one PUT).
- ``put_if_absent``: create a file only if it does not exist, atomically with its content
  (local: ``os.link`` of a complete temporary file, which fails if the name exists; object
  stores: a conditional PUT, ``If-None-Match: *``; an endpoint that rejects the header gets
  a check-then-put instead, with a warning: see ``docs/object-stores.md``).
- ``get`` / ``get_range``: whole or partial reads; a missing file raises ``FileNotFoundError``.
- ``listdir``: the names in one folder (one LIST request per 1000 names on S3).

On S3 (``s3://bucket/prefix``) every operation is one request: listings are ListObjectsV2
calls with a delimiter, never served from s3fs's listing cache (which would hide records other
processes wrote), reads are single GETs (ranged for items), and a missing "folder" is an empty
listing. The endpoint and credentials come from the standard places every process reads by
itself: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_PROFILE`` (botocore), ``FSSPEC_S3`` (fsspec), or ``storage_options``.

Files are written through a temporary file (``storage.fstemp.StoreTemporary``: a full disk, a quota or a
read-only file system is a ``StoreWriteError`` naming the store path, and leaves no partial temporary).
Temporary files are named ``.tmp-<host>-<pid>-<random>-<name>``; ``storage.maintenance.stale_temporaries`` finds
those left by dead writers so ``ovseg cache gc`` can remove them (object stores get none: an
upload is written to the local temporary folder and appears in the store whole, or not at all).
"""

from __future__ import annotations

import errno
import logging
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

from storage.fserrors import remote_io, s3_error, store_write
from storage.fstemp import StoreTemporary

log = logging.getLogger("ovseg.storage")

TMP_PREFIX = ".tmp-"
_S3_PROTOCOLS = ("s3", "s3a")
_CONFLICT_RETRIES = 5  # S3 answers 409 ConditionalRequestConflict to racing conditional PUTs: retry them


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
        storage_options: fsspec options for remote stores (endpoint, credentials); on S3 they
            default to what botocore and fsspec read from the environment.
    """

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None):
        self.location = location
        opts = dict(storage_options or {})
        if location.split("://", 1)[0] in _S3_PROTOCOLS:
            opts.setdefault("use_listings_cache", False)  # listings must show what other processes wrote
        self.fs, root = fsspec.core.url_to_fs(location, **opts)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_s3 = any(p in _S3_PROTOCOLS for p in protocols)
        self.conditional_writes = True  # cleared after the endpoint rejects If-None-Match

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @remote_io
    def exists(self, path: str) -> bool:
        """Whether a file or a non-empty folder exists."""
        if self.is_local:
            return os.path.exists(path)
        if self.is_s3:
            files, dirs = self._s3_list(path, max_keys=1)
            return bool(files or dirs) or self.size(path) is not None
        return self.fs.exists(path)

    # ------------------------------------------------------------------ writes
    @store_write
    @remote_io
    def put_atomic(self, path: str, data: bytes, durable: bool = True) -> None:
        """Replace ``path`` with ``data`` so that readers see all or nothing (``durable``: see ``put_if_absent``)."""
        if self.is_local:
            tmp = self._local_tmp(path, data, durable)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    @store_write
    @remote_io
    def put_if_absent(self, path: str, data: bytes, durable: bool = True) -> bool:
        """Create ``path`` with ``data`` unless it exists; True if this call created it.

        ``durable=False`` (local stores) skips the fsync: for files whose meaning ends with the process that
        wrote them (leases), which an OS crash makes worthless anyway; readers still see all or nothing."""
        if self.is_local:
            tmp = self._local_tmp(path, data, durable)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.conditional_writes:
            created = self._create_conditionally(path, data)
            if created is not None:
                return created
        if self.size(path) is not None:  # the fallback: a check, then a PUT
            return False
        self.fs.pipe_file(path, data)
        return True

    def _create_conditionally(self, path: str, data: bytes) -> bool | None:
        """A PUT with ``If-None-Match: *``: True if created, False if it exists, None if the endpoint lacks it."""
        attempt = 0
        while True:
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except (NotImplementedError, TypeError, ValueError, OSError) as e:
                code, status = s3_error(e)
                if code == "PreconditionFailed" or status == 412:  # exists (an endpoint not naming the condition)
                    return False
                if (code == "ConditionalRequestConflict" or status == 409) and attempt + 1 < _CONFLICT_RETRIES:
                    attempt += 1  # a racing conditional PUT on the same name: try again
                    time.sleep(0.05 * attempt)
                    continue
                unsupported = code == "NotImplemented" or status == 501 or getattr(e, "errno", None) == errno.ENOSYS
                if isinstance(e, OSError) and not unsupported:
                    raise
                self.conditional_writes = False
                log.warning("%s rejects conditional writes (If-None-Match: *): %s; creating files with a check "
                            "then a PUT instead (two processes may then both write a stage.json, never a "
                            "partial one; see docs/object-stores.md)", self.location, e)
                return None

    @store_write
    @remote_io
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

    def _local_tmp(self, path: str, data: bytes, durable: bool = True) -> str:
        with StoreTemporary(self, path) as tmp:  # a full disk leaves no partial temporary file behind
            tmp.write(data)
            tmp.close(sync=durable)
        return tmp.tmp

    def overwrite_in_place(self, path: str, data: bytes) -> bool:
        """Local stores: write ``data`` over the existing ``path`` padded with spaces to its size, in the
        blocks it already holds (needs no free space; not atomic). False if the file is missing or smaller,
        or the store is remote. For the last write of a run journal on a full disk."""
        if not self.is_local:
            return False
        try:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size < len(data):
                    return False
                f.write(data + b" " * (size - len(data)))
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError:
            return False

    # ------------------------------------------------------------------ reads
    @remote_io
    def get(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        if self.is_s3:  # one GET (s3fs would first HEAD the object to split large reads)
            return self.fs.cat_file(path, max_concurrency=1)
        return self.fs.cat_file(path)

    @remote_io
    def get_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (fewer if the file is shorter)."""
        if self.is_local:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        try:
            return self.fs.cat_file(path, start=start, end=end)
        except OSError as e:
            if s3_error(e)[0] == "InvalidRange":  # the object ends before ``start``
                return b""
            raise

    @remote_io
    def size(self, path: str) -> int | None:
        """Size in bytes, or None if the file is missing."""
        if self.is_s3:  # one HEAD; a folder of that name is not a file; other errors are errors
            bucket, key, _ = self.fs.split_path(path)
            try:
                return int(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])
            except FileNotFoundError:
                return None
        try:
            return os.path.getsize(path) if self.is_local else int(self.fs.size(path))
        except (FileNotFoundError, OSError):
            return None

    @remote_io
    def _s3_list(self, folder: str, recursive: bool = False, max_keys: int | None = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
        """Objects (ListObjectsV2 ``Contents``) and sub-folder names under ``folder``; empty if none."""
        bucket, key, _ = self.fs.split_path(folder)
        prefix = f"{key.strip('/')}/" if key.strip("/") else ""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        if max_keys is not None:
            kwargs["MaxKeys"] = max_keys
        files: list[dict[str, Any]] = []
        dirs: list[str] = []
        while True:
            resp = self.fs.call_s3("list_objects_v2", **kwargs)
            files += [dict(o, Name=o["Key"][len(prefix):], Path=f"{bucket}/{o['Key']}")
                      for o in resp.get("Contents", []) if o["Key"] != prefix]
            dirs += [p["Prefix"][len(prefix):].rstrip("/") for p in resp.get("CommonPrefixes", [])]
            if not resp.get("IsTruncated") or max_keys is not None:
                return files, dirs
            kwargs["ContinuationToken"] = resp["NextContinuationToken"]

    @remote_io
    def listdir(self, folder: str) -> list[str]:
        """Names (not paths) in ``folder``; empty if it does not exist."""
        if self.is_local:
            try:
                return os.listdir(folder)
            except FileNotFoundError:
                return []
        if self.is_s3:
            files, dirs = self._s3_list(folder)
            return [f["Name"] for f in files] + dirs
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    @remote_io
    def list_entries(self, folder: str) -> list[Entry]:
        """Files in ``folder`` with size and modification time (seconds since the epoch)."""
        if self.is_local:
            out = []
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
        if self.is_s3:
            return [Entry(f["Name"], int(f["Size"]), f["LastModified"].timestamp()) for f in self._s3_list(folder)[0]]
        try:
            infos = self.fs.ls(folder, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            if info.get("type") == "directory":
                continue
            mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            out.append(Entry(info["name"].rstrip("/").rsplit("/", 1)[-1], int(info.get("size") or 0), float(mtime)))
        return out

    @remote_io
    def subfolders(self, folder: str) -> list[str]:
        """Names of the sub-folders of ``folder``."""
        if self.is_local:
            try:
                return sorted(d.name for d in os.scandir(folder) if d.is_dir())
            except FileNotFoundError:
                return []
        if self.is_s3:
            return sorted(self._s3_list(folder)[1])
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
        if self.is_s3:
            for f in self._s3_list(folder, recursive=True)[0]:
                yield f["Path"], int(f["Size"])
            return
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return
        for p, info in found.items():
            yield p, int(info.get("size") or 0)

    # ------------------------------------------------------------------ deletes
    @remote_io
    def delete(self, path: str) -> bool:
        """Remove one file; True if it existed (S3: True unless the DELETE failed; deletes are idempotent)."""
        try:
            if self.is_local:
                os.remove(path)
            else:
                self.fs.rm_file(path)
            return True
        except FileNotFoundError:
            return False

    @remote_io
    def delete_tree(self, folder: str) -> None:
        """Remove a folder and everything under it (S3: one DeleteObjects request per 1000 objects)."""
        if self.is_local:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        elif self.is_s3:
            bucket = self.fs.split_path(folder)[0]
            keys = [f["Key"] for f in self._s3_list(folder, recursive=True)[0]]
            for i in range(0, len(keys), 1000):
                self.fs.call_s3("delete_objects", Bucket=bucket,
                                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
        elif self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)

    def mkdirs(self, folder: str) -> None:
        if self.is_local:
            Path(folder).mkdir(parents=True, exist_ok=True)


def is_temporary(name: str) -> bool:
    return name.startswith(TMP_PREFIX)
