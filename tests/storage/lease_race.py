"""Racing lease claims, shared by the local and the S3 lease tests."""

from __future__ import annotations

import threading

from storage.leases import LeaseManager


def assert_racing_claims_cover_every_item(managers: list[LeaseManager], items: list[str], rounds: int) -> None:
    """``rounds`` times, every manager claims ``items`` at the same instant (threads behind a barrier).

    After each round every item is held by at least one claimant, and each claimant reports every
    item either as its own or as busy (with its holder); then all leases are released.
    """
    for _ in range(rounds):
        results: list = [None] * len(managers)
        barrier = threading.Barrier(len(managers))

        def claim(i: int) -> None:
            barrier.wait()
            results[i] = managers[i].claim("s", "k", items)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(managers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {i for r in results for i in r.mine} == set(items)
        for r in results:  # an item a claimant gave up is reported as busy, with its holder
            assert set(r.mine) | set(r.busy) == set(items)
        for m, r in zip(managers, results):
            m.release(r)
