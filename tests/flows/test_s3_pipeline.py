"""The whole tiny pipeline on an S3 store (moto's server on localhost): the same outputs as on a local
store, bit for bit; a rerun computes nothing and writes nothing to the stage outputs; request counts.

``python -m tests.flows.test_s3_pipeline`` prints the request table of ``docs/object-stores.md``.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest

from flows.pipeline import run_experiment
from storage.store import Store
from storage.tables import read_table
from tasks.runtime import _read_shared, open_store
from tests.flows.conftest import computed, tiny_experiment
from tests.s3server import KINDS, S3Server, shared_server

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]  # three runs: about 100 s


def _fresh_process_caches() -> None:
    """Forget the per-process store objects, as a new ``ovseg run`` process starts without them."""
    open_store.cache_clear()
    _read_shared.cache_clear()


def run_counted(server: S3Server, location: str, **overrides: Any):
    """Run the tiny experiment on ``location`` as a new process would; returns (summary, requests sent
    per (kind, area, file kind))."""
    _fresh_process_caches()
    before = server.snapshot(by_file=True)
    summary = run_experiment(tiny_experiment(location, **overrides), progress=False)  # type: ignore[arg-type]
    return summary, server.snapshot(by_file=True) - before


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny experiment on a local store and on an S3 store, then rerun on S3."""
    server = shared_server()
    local = tmp_path_factory.mktemp("local-store")
    s3_url = f"s3://{server.create_bucket()}/ovseg-store"
    local_summary = run_experiment(tiny_experiment(local), progress=False)
    s3_summary, first = run_counted(server, s3_url)
    again, rerun = run_counted(server, s3_url)
    _fresh_process_caches()
    return local, s3_url, local_summary, s3_summary, again, first, rerun


def test_s3_outputs_are_bit_identical_to_a_local_store(runs):
    local, s3_url, local_summary, s3_summary, *_ = runs
    assert s3_summary.failed == 0 and computed(s3_summary) == computed(local_summary)
    a, b = Store(local, create=False), Store(s3_url, create=False)
    sets = a.stage_sets()
    assert sorted(b.stage_sets()) == sorted(sets) and len(sets) >= 9  # the same stage keys
    n = 0
    for stage, key in sets:
        items = a.complete_items(stage, key)
        assert b.complete_items(stage, key) == items and items, stage
        for item in sorted(items):
            x, y = a.read_item(stage, key, item), b.read_item(stage, key, item)
            assert sorted(x) == sorted(y), (stage, item)
            for name in x:
                assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, (stage, item, name)
                assert x[name].tobytes() == y[name].tobytes(), (stage, item, name)
                n += 1
    assert n > 30
    cols = ["method", "dataset", "class_index", "iou", "images"]
    ma, mb = (read_table(s, "metrics").select(cols).sort_by([("method", "ascending"), ("class_index", "ascending")])
              for s in (a, b))
    assert ma.equals(mb)


def test_a_rerun_on_s3_computes_and_writes_nothing_and_reads_each_record_once(runs):
    local, s3_url, _, _, again, first, rerun = runs
    assert computed(again) == {} and again.failed == 0 and sum(s.cached for s in again.stages) > 0
    store = Store(s3_url, create=False)
    records = Counter(stage for stage, key in store.stage_sets()
                      for _ in store.backend.listdir(f"{store.stage_dir(stage, key)}/records"))
    writes = Counter()
    for (kind, where, what), n in rerun.items():
        if where in ("journal", "tables", "store"):
            continue
        assert kind != "HEAD" and not (kind == "GET" and what not in ("records", "stage.json")), (kind, where, what)
        if kind in ("PUT", "DELETE"):
            writes[what] += n
        if kind == "GET":  # each completion record once (and stage.json, checked for damage): no pack is read
            assert n <= (records[where] if what == "records" else sum(1 for st, _ in store.stage_sets() if st == where))
    sets = len(store.stage_sets())
    # no pack, record, drop, index or lease: per set one refused conditional create of stage.json
    # (412: it exists) and the storage budget's last-use time
    assert writes == {"stage.json": sets, "last-used.json": sets}
    assert sum(rerun.values()) < sum(first.values())


def _by_area(counts: Counter) -> Counter:
    out: Counter = Counter()
    for (kind, where, _), n in counts.items():
        out[(kind, where)] += n
    return out


def table(first: Counter, rerun: Counter, images: int) -> list[str]:
    """Markdown rows: requests per store area (and per image) of a first run and of a no-op rerun."""
    first, rerun = _by_area(first), _by_area(rerun)
    areas = sorted({a for _, a in first} | {a for _, a in rerun}, key=lambda a: (a in ("journal", "tables", "store"), a))
    again = ("PUT", "GET", "LIST")
    rows = ["| area | " + " | ".join(KINDS) + " | per image | rerun " + " | rerun ".join(again) + " | rerun all |",
            "|" + "---|" * (len(KINDS) + len(again) + 3)]
    for a in [*areas, None]:
        f = [sum(v for (k, ar), v in first.items() if k == kind and a in (None, ar)) for kind in KINDS]
        r = [sum(v for (k, ar), v in rerun.items() if k == kind and a in (None, ar)) for kind in KINDS]
        name = "**all**" if a is None else a
        rows.append(f"| {name} | " + " | ".join(map(str, f)) + f" | {sum(f) / images:.1f} | "
                    + " | ".join(str(r[KINDS.index(k)]) for k in again) + f" | {sum(r)} |")
    return rows


def main(argv: list[str]) -> int:
    """Print the request tables for 4 images at batch sizes 8 and 1 (the figures in docs/object-stores.md)."""
    import logging
    import os

    from prefect.testing.utilities import prefect_test_harness

    from flows.cli import configure_prefect
    from tests.flows.conftest import SAMPLE

    logging.basicConfig(level=logging.ERROR)
    configure_prefect()
    images = int(argv[0]) if argv else 4
    server = shared_server()
    datasets = [{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                 "limit": images}]
    with prefect_test_harness(server_startup_timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                                                                        "120"))):
        for batch in (8, 1):
            url = f"s3://{server.create_bucket()}/ovseg-store"
            runner = {"kind": "local", "workers": 1, "batch_size": batch}
            _, first = run_counted(server, url, datasets=datasets, runner=runner)
            _, rerun = run_counted(server, url, datasets=datasets, runner=runner)
            print(f"\n{images} images, batch_size {batch}: first run {sum(first.values())} requests, "
                  f"no-op rerun {sum(rerun.values())}\n")
            print("\n".join(table(first, rerun, images)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
