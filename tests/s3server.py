"""A local S3 endpoint for the tests: moto's S3 server on a free 127.0.0.1 port, counting requests.

``shared_server()`` starts one server per test process (s3fs caches its clients, so the
endpoint must not move within a process) and points the standard AWS variables at it, which
every process started afterwards inherits: ``AWS_ENDPOINT_URL_S3``, test credentials, a
region, and no profile, config file or instance metadata lookup (nothing leaves localhost).

Two differences from Amazon S3 are handled here, in the server, never in ovseg:

- moto checks ``If-None-Match: *`` and then writes, in two steps; S3 does both atomically.
  The server serialises conditional PUTs, so racing writers meet S3's semantics.
- ``S3Server(conditional_writes=False)`` answers conditional PUTs with ``501 NotImplemented``,
  as an endpoint without conditional writes does, to test ovseg's fallback; ``conflicts=N``
  answers the next N conditional PUTs with ``409 ConditionalRequestConflict``, as S3 does to a
  conditional PUT racing another one on the same key.

Every request is counted by kind (``PUT``, ``GET``, ``HEAD``, ``LIST``, ``DELETE``), by the store
area its key falls in (a stage name for ``stages/<stage>/...`` and ``leases/<stage>/...``, else
``journal``, ``tables`` or ``store``) and by the kind of file (``packs``, ``records``, ``leases``
...): ``S3Server.snapshot()``.
"""

from __future__ import annotations

import atexit
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

REGION = "us-east-1"
KEY_ID = "ovseg-test-key"
SECRET = "ovseg-test-secret"
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE")

_NOT_IMPLEMENTED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code><Message>A header you '
                    b'provided implies functionality that is not implemented</Message><Header>If-None-Match</Header>'
                    b'</Error>')
_CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ConditionalRequestConflict</Code><Message>A '
             b'conflicting conditional operation is currently in progress against this resource.</Message></Error>')


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


def request_kind(method: str, path: str, query: str) -> tuple[str, str]:
    """``(kind, key)`` of a path-style S3 request: kind is PUT / GET / HEAD / LIST / DELETE / BUCKET."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    q = parse_qs(query, keep_blank_values=True)
    if not key:
        if method == "GET" and ("list-type" in q or "prefix" in q or not q):
            return "LIST", q.get("prefix", [""])[0]
        if method == "POST" and "delete" in q:
            return "DELETE", ""
        return "BUCKET", ""
    if method == "POST":  # multipart upload: create, complete
        return "PUT", key
    return method, key


def area(key: str) -> tuple[str, str]:
    """Where a key belongs in a store: (stage name, or ``journal`` / ``tables`` / ``store``; the kind of
    file: ``packs``, ``records``, ``drops``, ``index``, ``leases``, ``stage.json``, ``last-used.json`` ...)."""
    parts = key.split("/")
    for i, p in enumerate(parts[:-1]):
        if p in ("stages", "leases") and parts[i + 1]:
            rest = parts[i + 3:] if p == "stages" else ["leases"]
            return parts[i + 1], (rest[0] if rest and rest[0] else "listing")
    for p in parts:
        if p in ("journal", "tables"):
            return p, p
    return "store", "store"


class S3Server:
    """A moto S3 server on 127.0.0.1 (a free port), counting requests.

    Args:
        conditional_writes: False makes the server reject ``If-None-Match`` on PUT with 501.
        conflicts: how many conditional PUTs to answer with 409 first.
    """

    def __init__(self, conditional_writes: bool = True, conflicts: int = 0):
        self.conditional_writes = conditional_writes
        self.conflicts = conflicts
        self.counts: Counter[tuple[str, str, str]] = Counter()  # (kind, area, file kind)
        self._count_lock = threading.Lock()
        self._conditional_lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-test-server", daemon=True)
        self._thread.start()

    def _wsgi(self, environ: dict[str, Any], start_response) -> Iterable[bytes]:
        kind, key = request_kind(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                 environ.get("QUERY_STRING", ""))
        with self._count_lock:
            self.counts[(kind, *area(key))] += 1
        if "HTTP_IF_NONE_MATCH" not in environ or environ["REQUEST_METHOD"] not in ("PUT", "POST"):
            return self._app(environ, start_response)
        if not self.conditional_writes:
            return self._error(start_response, "501 Not Implemented", _NOT_IMPLEMENTED)
        with self._conditional_lock:  # check and write as one step, as S3 does
            if self.conflicts > 0:
                self.conflicts -= 1
                return self._error(start_response, "409 Conflict", _CONFLICT)
            return list(self._app(environ, start_response))

    @staticmethod
    def _error(start_response, status: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]

    def storage_options(self) -> dict[str, Any]:
        """fsspec options naming this server explicitly (instead of the environment)."""
        return {"endpoint_url": self.url, "key": KEY_ID, "secret": SECRET, "client_kwargs": {"region_name": REGION}}

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that point botocore (and so s3fs, in every process) at this server."""
        return {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        """A boto3 client of this server (to make buckets, or damage objects behind the store's back)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                            region_name=REGION)

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh name by default); returns its name."""
        name = name or f"ovseg-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def reset_counts(self) -> None:
        with self._count_lock:
            self.counts.clear()

    def snapshot(self, by_file: bool = False) -> Counter[tuple[str, ...]]:
        """Requests so far per (kind, area), or per (kind, area, file kind) with ``by_file``."""
        with self._count_lock:
            counts = Counter(self.counts)
        if by_file:
            return counts
        out: Counter[tuple[str, ...]] = Counter()
        for (kind, where, _), n in counts.items():
            out[(kind, where)] += n
        return out

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


_shared: S3Server | None = None


def shared_server() -> S3Server:
    """The test process's S3 server, started on first use; sets the AWS variables (see the module docstring)."""
    global _shared
    if _shared is None:
        _shared = S3Server()
        for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            os.environ.pop(var, None)
        os.environ.update(_shared.environment())
        atexit.register(_shared.stop)
    return _shared
