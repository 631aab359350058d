"""``python -m tests.flows.kill_point POINT ovseg-args...``: ``ovseg`` in this process, SIGKILLed by itself at one
exact point of the ``bank_index`` item's write (or of ``ovseg bank import``'s), which a polling parent cannot hit (the bank's one item is written in
milliseconds). The pipeline runs unchanged; only the store backend's write calls are wrapped to kill the process
beside them (a real SIGKILL: no ``finally``, no atexit, no flush).

POINT (in the order the index stage reaches them):

- ``registry``: the bank's registry was just replaced (``storage.bank.write_registry``), the index not yet built;
- ``segment``: the first segment of the values in region-id order (``storage.bank_rows``) was just moved into place;
- ``pack``: the index pack's temporary file is complete, not yet moved into place;
- ``record``: the pack is in place, its completion record not yet written.

``ovseg bank import`` (``flows.bank_import``) reaches ``pack`` and ``record`` when it writes the ``bank_index`` item,
after ``IMPORT_POINTS``' own (in order):

- ``rows``: half of a row file's rows are in its temporary (``storage.fstemp.StoreTemporary``), not yet moved;
- ``rows_moved``: the first row file is in place, its ``rows`` item (the CRCs) not yet written;
- ``values``: the first value store is complete (its ``rows`` record written), the second not yet started.

``HOLD_POINTS`` pause instead of dying (a live writer another process meets): ``rows_hold`` writes half of the first
row file's rows into its temporary, creates ``$OVSEG_HOLD_DIR/held`` and waits for ``$OVSEG_HOLD_DIR/go`` (at most
five minutes) before it goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from flows.cli import main
from storage.fsio import Backend
from storage.fstemp import StoreTemporary

POINTS = ("registry", "segment", "pack", "record")
IMPORT_POINTS = ("rows", "rows_moved", "values", "pack", "record")
HOLD_POINTS = ("rows_hold",)
_INDEX_DIR = "/stages/bank_index/"
_ROW_FILE = "/rows/values.f16"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Wrap ``Backend``'s writes so that this process SIGKILLs itself at ``point`` (one of ``POINTS``)."""
    if point not in POINTS + IMPORT_POINTS + HOLD_POINTS:
        raise ValueError(f"kill point must be one of {POINTS + IMPORT_POINTS + HOLD_POINTS}, got {point!r}")
    put_atomic, put_file, put_if_absent = Backend.put_atomic, Backend.put_file, Backend.put_if_absent
    write = StoreTemporary.write

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

    def half_rows(self: StoreTemporary, data: bytes) -> int:
        if self.path.endswith(_ROW_FILE):
            write(self, data[: len(data) // 2])
            self.flush()  # in the page cache: what a SIGKILL leaves of the file
            _die()
        return write(self, data)

    held = []

    def hold_rows(self: StoreTemporary, data: bytes) -> int:
        if not self.path.endswith(_ROW_FILE) or held:
            return write(self, data)
        held.append(self.path)
        half = write(self, data[: len(data) // 2])
        self.flush()
        folder = Path(os.environ["OVSEG_HOLD_DIR"])
        (folder / "held").write_text(self.tmp)
        end = time.time() + 300
        while not (folder / "go").exists() and time.time() < end:
            time.sleep(0.05)
        return half + write(self, data[len(data) // 2:])

    def after_row_file(self: Backend, local_path: str, path: str) -> None:
        put_file(self, local_path, path)
        if path.endswith(_ROW_FILE):
            _die()

    def after_values_record(self: Backend, path: str, data: bytes, **kw: Any) -> Any:
        created = put_if_absent(self, path, data, **kw)
        if "/stages/bank_values/" in path and "/records/" in path:
            _die()
        return created

    def after_segment(self: Backend, local_path: str, path: str) -> None:
        put_file(self, local_path, path)
        if "/stages/bank_values/" in path and path.endswith(".rows"):
            _die()

    wrappers: dict[str, tuple[type, str, Callable[..., Any]]] = {
        "registry": (Backend, "put_atomic", after_registry), "pack": (Backend, "put_file", before_move),
        "record": (Backend, "put_if_absent", before_record),
        "segment": (Backend, "put_file", after_segment), "rows": (StoreTemporary, "write", half_rows),
        "rows_moved": (Backend, "put_file", after_row_file), "values": (Backend, "put_if_absent", after_values_record),
        "rows_hold": (StoreTemporary, "write", hold_rows)}
    cls, name, fn = wrappers[point]
    setattr(cls, name, fn)


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
