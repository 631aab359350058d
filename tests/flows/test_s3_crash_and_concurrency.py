"""On an S3 store (moto's server on localhost, see ``tests.s3server``), with real ``ovseg run`` processes: a SIGKILL
while the run writes, then a plain rerun, gives outputs bit-identical to a clean local run; two runs started at
once compute each output exactly once."""

from __future__ import annotations

import pytest

from tests.flows.concurrent_runs import experiment, finish, kill_during_write, records_per_item, spawn, write_yaml
from tests.flows.conftest import assert_same_outputs, store_snapshot
from tests.s3server import shared_server

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]  # whole runs in processes on S3: minutes


def test_sigkill_while_writing_to_s3_then_a_rerun_gives_identical_outputs(tmp_path):
    server = shared_server()
    url = f"s3://{server.create_bucket()}/store"
    exp = experiment(url, images=3)
    reference = tmp_path / "reference"
    # the uninterrupted reference runs as the runs under test do, in a fresh process: this test process carries the
    # state of the tests before it (thread counts, cached models), which would make its bits another run's
    rc, out = finish(spawn(write_yaml(experiment(reference, images=3), tmp_path / "ref" / "exp.yaml")))
    assert rc == 0, out[-3000:]
    exp_file = write_yaml(exp, tmp_path / "exp.yaml")
    kill_during_write(spawn(exp_file), url, "mask_class_tokens")  # its packs and records are being written
    partial = store_snapshot(url)
    expected = store_snapshot(reference)
    assert 0 < len(partial) < len(expected)
    rc, out = finish(spawn(exp_file))
    assert rc == 0, out[-3000:]
    assert_same_outputs(store_snapshot(url), expected)
    assert set(records_per_item(url).values()) == {1}  # what the killed run completed was not computed again


def test_two_runs_at_once_on_s3_compute_each_output_exactly_once(tmp_path):
    server = shared_server()
    url = f"s3://{server.create_bucket()}/store"
    exp = experiment(url, images=6)
    procs = [spawn(write_yaml(exp, tmp_path / name / "exp.yaml")) for name in ("a", "b")]
    for rc, out in [finish(p) for p in procs]:
        assert rc == 0, out[-3000:]
    counts = records_per_item(url)
    assert len(counts) > 6 * 5
    twice = {k: n for k, n in counts.items() if n != 1}
    assert not twice, f"{len(twice)} of {len(counts)} outputs computed more than once: {sorted(twice)[:10]}"
