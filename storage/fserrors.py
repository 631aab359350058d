"""The errors of the store's file operations, and the decorators that raise them (``storage.fsio``)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def s3_error(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status behind an exception s3fs raised (``("", 0)`` if none)."""
    resp = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class StoreWriteError(OSError):
    """A write to the store failed (disk full, quota, read-only file system, permissions, the endpoint refused it).

    Raised by the backend's write operations, with the errno of the cause; an ``OSError``, so
    code that tolerates write failures (one item's pack, a heartbeat) still catches it. The
    run's own bookkeeping does not: such a run ends with ``EXIT_STORAGE`` (4)."""


def write_error(e: OSError, path: str) -> StoreWriteError:
    """The ``StoreWriteError`` for a failed write of the store path ``path`` (``e`` itself if it is one)."""
    if isinstance(e, StoreWriteError):
        return e
    return StoreWriteError(e.errno, f"cannot write {path}: {e.strerror or e}")


def store_write(method: Callable[..., T]) -> Callable[..., T]:
    """Raise a failed write as ``StoreWriteError`` naming the store path written (the argument ``path``)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            path = kwargs.get("path") or args[1 if method.__name__ == "put_file" else 0]
            err = write_error(e, path)
            if err is e:
                raise
            raise err from e

    return wrapper


def remote_io(method: Callable[..., T]) -> Callable[..., T]:
    """Raise the connection and protocol failures of a remote store as ``OSError``, as local ones are.

    botocore's and aiohttp's own exceptions (an unreachable endpoint, a dropped connection) are
    not ``OSError``; callers that tolerate I/O failures (heartbeats, journals) catch ``OSError``.
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except (OSError, ValueError, TypeError, NotImplementedError):
            raise
        except Exception as e:  # noqa: BLE001 - translated, with the original chained
            raise OSError(errno.EIO, f"{type(e).__name__}: {e}") from e

    return wrapper
