"""``python -m tests.flows.kill_point POINT ovseg-args...``: ``ovseg`` in this process, SIGKILLed by itself at one
exact point of the ``bank_index`` item's write, which a polling parent cannot hit (the bank's one item is written in
milliseconds). The pipeline runs unchanged; only the store backend's write calls are wrapped to kill the process
beside them (a real SIGKILL: no ``finally``, no atexit, no flush).

POINT (in the order the index stage reaches them):

- ``registry``: the bank's registry was just replaced (``storage.bank.write_registry``), the index not yet built;
- ``pack``: the index pack's temporary file is complete, not yet moved into place;
- ``record``: the pack is in place, its completion record not yet written.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from flows.cli import main
from storage.fsio import Backend

POINTS = ("registry", "pack", "record")
_INDEX_DIR = "/stages/bank_index/"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Wrap ``Backend``'s writes so that this process SIGKILLs itself at ``point`` (one of ``POINTS``)."""
    if point not in POINTS:
        raise ValueError(f"kill point must be one of {POINTS}, got {point!r}")
    put_atomic, put_file, put_if_absent = Backend.put_atomic, Backend.put_file, Backend.put_if_absent

    def after_registry(self: Backend, path: str, data: bytes, **kw: Any) -> None:
        put_atomic(self, path, data, **kw)
        if "/banks/" in path and path.rsplit("/", 1)[-1].startswith("registry-"):
            _die()

    def before_move(self: Backend, local_path: str, path: str) -> None:
        if _INDEX_DIR in path:
            _die()
        put_file(self, local_path, path)

    def before_record(self: Backend, path: str, data: bytes, **kw: Any) -> Any:
        if _INDEX_DIR in path and "/records/" in path:
            _die()
        return put_if_absent(self, path, data, **kw)

    wrappers: dict[str, tuple[str, Callable[..., Any]]] = {
        "registry": ("put_atomic", after_registry), "pack": ("put_file", before_move),
        "record": ("put_if_absent", before_record)}
    name, fn = wrappers[point]
    setattr(Backend, name, fn)


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
