"""An interrupt (Ctrl-C: ``KeyboardInterrupt`` in the main thread) during a batch, on a real store.

The batch's writer thread is a daemon: if the main thread left a batch while its writer was still writing the pack or
its record, the process would end in the middle of that write and leave a temporary file (and the lease) behind. So
the interrupt propagates only once the writer has stored what it was handed and released the lease; a second
interrupt while waiting leaves at once. With loader threads on, the loader blocked on its full queue is drained, not
waited for forever."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from storage.store import Store
from storage.writing import PackSession
from tasks.executor import run_batch
from tasks.streams import InterruptedAgain, wait_through_interrupt
from tasks.stages import Stage
from tests.tasks.test_executor import Params, _ctx, _rows  # the executor tests' synthetic stage node and rows


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler for the test (a CI job started in the background inherits SIGINT ignored)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main = threading.main_thread().ident  # to the main thread: its wait is interrupted, as by a terminal's Ctrl-C
        yield lambda delay: threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT)).start()
    finally:
        signal.signal(signal.SIGINT, old)


def _stage(interrupt_at: str | None = None) -> Stage:
    def compute(ctx, model, inputs):
        if any(i == interrupt_at for i in inputs):
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the compute
        return [({"x": np.full(3, int(i[1:]))}, {}) for i in inputs]

    return Stage("synthetic", "test", "image", inputs=(), params=Params, code_version="1",
                 models=lambda ctx: "model", load=lambda ctx, row: row["image_id"], compute=compute, arrays=("x",))


def _stored(store: Path) -> set[str]:
    state = Store(store, create=False).state("synthetic", _ctx(store).key)
    return {f"i{k}" for k in range(40) if state.pack_of(f"i{k}") is not None}


def _left_behind(store: Path) -> list[Path]:
    return [*store.rglob(".tmp-*"), *(store / "leases").rglob("*.json")]


@pytest.mark.parametrize("io_threads", ["off", "on"])
def test_an_interrupt_in_the_compute_stores_what_was_computed_and_leaves_nothing_behind(tmp_path, io_threads):
    store = tmp_path / "st"
    got: dict = {}

    def batch() -> None:  # in a thread, so that a loader blocked for ever fails the test instead of hanging it
        try:
            run_batch(_ctx(store, prefetch=1, write_queue=1, io_threads=io_threads), _rows(30), _stage("i5"))
        except BaseException as e:  # noqa: BLE001 - looked at below
            got["error"] = e

    t = threading.Thread(target=batch, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the batch did not end after the interrupt (its loader blocked on a full queue?)"
    assert isinstance(got.get("error"), KeyboardInterrupt)
    assert _stored(store) == {f"i{k}" for k in range(5)}  # computed before the interrupt: stored, one pack
    assert not _left_behind(store)


def test_an_interrupt_while_the_writer_commits_waits_for_the_pack_its_record_and_the_lease(tmp_path, monkeypatch,
                                                                                            ctrl_c):
    store = tmp_path / "st"
    commit = PackSession.commit

    def slow_commit(self):
        time.sleep(1.0)  # the interrupt arrives in the meantime (after 0.2 s), the main thread waiting for this
        return commit(self)

    monkeypatch.setattr(PackSession, "commit", slow_commit)
    ctrl_c(0.2)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_batch(_ctx(store, io_threads="off"), _rows(4), _stage())
    assert time.perf_counter() - t0 >= 1.0, "the interrupt left before the writer had committed"
    assert _stored(store) == {"i0", "i1", "i2", "i3"}
    assert not _left_behind(store)


def test_a_second_interrupt_while_waiting_for_a_writer_leaves_at_once(ctrl_c):
    done = threading.Event()
    writer = threading.Thread(target=lambda: (time.sleep(3.0), done.set()), daemon=True)
    writer.start()
    ctrl_c(0.2)
    ctrl_c(0.6)
    t0 = time.perf_counter()
    with pytest.raises(InterruptedAgain):
        wait_through_interrupt(done)
    assert time.perf_counter() - t0 < 2.5 and not done.is_set()
    done.wait()


def test_waiting_after_an_interrupt_the_next_one_leaves_at_once(ctrl_c, caplog):
    """The chain's clean-up after a first Ctrl-C waits for its writers; a second one while it does leaves at once."""
    done = threading.Event()
    writer = threading.Thread(target=lambda: (time.sleep(3.0), done.set()), daemon=True)
    writer.start()
    ctrl_c(0.3)
    t0 = time.perf_counter()
    with pytest.raises(InterruptedAgain):
        wait_through_interrupt(done, interrupted=True)
    assert time.perf_counter() - t0 < 2.0 and not done.is_set()
    assert "interrupt again to stop now" in caplog.text  # said before waiting
    done.wait()
    wait_through_interrupt(done, interrupted=True)  # an ended writer: nothing to wait for, nothing said


def test_a_second_interrupt_while_a_batch_finishes_its_writes_leaves_them(tmp_path, monkeypatch, ctrl_c):
    """Ctrl-C in the compute, then again while the batch waits for its writer's commit: the batch leaves at once
    (``InterruptedAgain``, a ``KeyboardInterrupt``), the writer still at work."""
    store = tmp_path / "st"
    commit, committed = PackSession.commit, threading.Event()

    def slow_commit(self):
        time.sleep(2.0)
        try:
            return commit(self)
        finally:
            committed.set()

    monkeypatch.setattr(PackSession, "commit", slow_commit)
    ctrl_c(0.5)  # the batch is then waiting for the commit of what it computed before the first interrupt
    t0 = time.perf_counter()
    with pytest.raises(InterruptedAgain):
        run_batch(_ctx(store, io_threads="off"), _rows(8), _stage("i3"))
    assert time.perf_counter() - t0 < 1.8 and not committed.is_set()
    committed.wait(10)  # the writer goes on (a daemon: a process ending now would stop it)
    assert _stored(store) == {"i0", "i1", "i2"}


def test_one_interrupt_while_waiting_for_a_writer_is_raised_once_it_has_ended(ctrl_c, caplog):
    done = threading.Event()
    writer = threading.Thread(target=lambda: (time.sleep(1.0), done.set()), daemon=True)
    writer.start()
    ctrl_c(0.2)
    with pytest.raises(KeyboardInterrupt):
        wait_through_interrupt(done)
    assert done.is_set()
    assert "interrupt again to stop now" in caplog.text
