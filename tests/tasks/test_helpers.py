"""Reused helper threads (``tasks.helpers``): a finished helper runs the next job, a job may wait on a job started
after it, and an error in a job is logged without losing the helper."""

from __future__ import annotations

import threading

from tasks import helpers


def test_a_finished_helper_runs_the_next_job_under_the_jobs_name():
    seen = []
    first = helpers.start(lambda: seen.append((threading.current_thread(), threading.current_thread().name)), "a")
    assert first.join(5) and not first.is_alive()
    second = helpers.start(lambda: seen.append((threading.current_thread(), threading.current_thread().name)), "b")
    assert second.join(5)
    assert seen[0][0] is seen[1][0]  # one thread, started once
    assert [name for _, name in seen] == ["a", "b"]


def test_jobs_that_wait_on_each_other_all_run_and_errors_are_logged(caplog):
    gate = threading.Event()
    waiting = [helpers.start(lambda: gate.wait(5), f"w{i}") for i in range(6)]  # more than any pool had idle
    helpers.start(gate.set, "opener").join(5)
    assert all(job.join(5) for job in waiting)

    def boom():
        raise ValueError("job failure")

    assert helpers.start(boom, "boom").join(5)
    assert "helper job boom failed" in caplog.text and "job failure" in caplog.text
    assert helpers.start(lambda: None, "after").join(5)
