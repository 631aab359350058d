"""A full disk under a real run: the store on a small tmpfs that another writer fills up as soon as the run has
completed its first output. The run stops with exit 4 and a message naming the store and the cause, its journal is finished
(``failed``, exit code 4: not left ``running``), no temporary file and no pack without its record is left
behind, and once space is free again a plain rerun completes."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.flows.concurrent_runs import experiment, finish, spawn, write_yaml

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # two runs of 2 images: about 90 s


def _fill(path: Path, stop: threading.Event) -> None:
    """Take every free byte of the file system, again whenever some is freed, until ``stop``."""
    with open(path, "ab", buffering=0) as f:
        while not stop.is_set():
            for size in (1 << 20, 1 << 12):
                try:
                    f.write(b"\0" * size)
                    break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
            else:
                time.sleep(0.001)


def test_a_full_disk_stops_the_run_with_exit_4_a_finished_journal_and_no_leftovers(tmp_path, small_disk):
    store = small_disk / "store"
    exp_file = write_yaml(experiment(store, images=2, batch_size=1), tmp_path / "exp.yaml")
    proc = spawn(exp_file)
    deadline = time.time() + 300
    while not list(store.glob("stages/*/*/records/*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the disk fills up while the run is computing and writing its stages
    assert proc.poll() is None, "the run ended before the disk could be filled"
    stop = threading.Event()
    filler = threading.Thread(target=_fill, args=(small_disk / f"filler-{uuid.uuid4().hex}", stop), daemon=True)
    filler.start()
    try:
        rc, out = finish(proc)
    finally:
        stop.set()
        filler.join()
    assert rc == 4, out[-3000:]
    assert f"error: the store {store} cannot be written" in out and "No space left on device" in out, out[-3000:]
    assert "the run stopped, its completed outputs are kept" in out and "Traceback" not in out
    (journal,) = (store / "journal").glob("*.json")
    data = json.loads(journal.read_bytes())
    assert (data["status"], data["exit_code"]) == ("failed", 4)
    assert not [p for p in store.rglob(".tmp-*")]  # no temporary file left by a writer that hit the full disk
    for packs in store.rglob("packs"):  # every pack has its completion record
        records = {p.stem for p in (packs.parent / "records").glob("*.json")}
        assert {p.stem for p in packs.glob("*.zip")} <= records, packs

    for p in small_disk.glob("filler-*"):
        os.remove(p)
    rc, out = finish(spawn(exp_file))
    assert rc == 0, out[-3000:]
