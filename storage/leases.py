"""Leases: which process is computing which items of a stage output set, kept alive by heartbeat.

One lease file per claimed batch, ``leases/<stage>/<key>/<lease id>.json``, holds the owner
(host, pid, run id), the claimed items, the owner's TTL and a heartbeat time. The owner's
heartbeat thread rewrites the heartbeat every TTL/4 while it works; a lease whose heartbeat is
older than its TTL is dead wherever its owner ran (another container, another PID namespace, a
machine that lost power), and is taken over. Hosts must agree on the time to within the TTL
(NTP does far better). A lease written on this OS instance and in this PID namespace (the same
host name, Linux boot id and ``/proc/self/ns/pid``) whose process no longer exists (or is a
zombie) is dead at once: a rerun after a SIGKILL on the same machine does not wait out the TTL.
Where any of the three differs or cannot be read, only the heartbeat counts; a reused PID reads
as alive, and the heartbeat decides.

Claiming (``LeaseManager.claim``): list the live leases, take the items none of them holds,
write the lease (atomic create), list again; where another live lease with a smaller id (an
earlier claim) overlaps, give those items up. An overlapping lease with a larger id may have
been written by a claimant whose own second listing came before this lease was written (a
claimant descheduled between taking its id and writing its lease): an item it still lists is
kept only once it drops it (it does, when its listing sees this smaller id), re-listing after
``SETTLE_WAITS``, and given up otherwise. So two claimants never both keep an item: the later
writer's listing sees the earlier lease, and the earlier one waits for the later one's decision
(both giving an item up is possible under extreme delays and costs a retry, never a duplicate).
Duplicated work is harmless: both write whole packs, and the newest copy is the one read. A lease
says nothing about completion: the executor reads completion again after a claim, so an item
another run completed and released meanwhile is not computed twice (``tasks.executor``).

Lease files are written without fsync (``durable=False``; every batch of every stage claims one,
and an fsync costs milliseconds): a lease means something only while its owner's heartbeat runs,
so after an OS crash it is dead anyway, and one that the crash left empty or torn reads as dead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from storage.fsio import Backend, is_temporary
from storage.records import new_id

log = logging.getLogger("ovseg.storage")

LEASES = "leases"
DEFAULT_TTL = 120.0
SETTLE_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8)  # seconds between looks while a later overlapping lease still lists items


class LeaseError(RuntimeError):
    """A lease could not be written or refreshed (e.g. the disk is full)."""


@dataclass(frozen=True)
class LeaseInfo:
    """A lease file as read from the store."""

    lease_id: str
    owner: dict
    items: tuple[str, ...]
    heartbeat: float
    ttl: float

    def alive(self, now: float | None = None) -> bool:
        """Its heartbeat is within its TTL, and its owner is not a process known to be gone (``owner_gone``)."""
        return (now if now is not None else time.time()) - self.heartbeat <= self.ttl and not owner_gone(self.owner)

    def describe(self) -> str:
        o = self.owner
        return f"run {o.get('run_id') or '?'} on {o.get('host', '?')} (pid {o.get('pid', '?')})"


@dataclass
class Claim:
    """The outcome of a claim: the items this process computes, and those another live process holds."""

    lease_id: str | None
    stage: str
    key: str
    mine: list[str] = field(default_factory=list)
    busy: dict[str, LeaseInfo] = field(default_factory=dict)


def owner_record(run_id: str = "") -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, **_os_instance()}


def _os_instance() -> dict:
    """This process's OS instance and PID namespace: ``boot`` (the Linux boot id) and ``pidns``; {} where unknown.
    Read once per process (a forked child reads its own), not on every lease check."""
    return _os_instance_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _os_instance_of(pid: int) -> dict:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return {"boot": f.read().strip(), "pidns": os.readlink("/proc/self/ns/pid")}
    except OSError:
        return {}


def owner_gone(owner: dict) -> bool:
    """Whether a lease's owner ran in this OS instance and PID namespace and its process no longer exists (or is a
    zombie, killed and not reaped yet). False whenever that cannot be told: another host, another boot or PID
    namespace, an owner record without them (older leases, other systems), this process itself."""
    here = _os_instance()
    pid = owner.get("pid")
    if (not here or owner.get("boot") != here["boot"] or owner.get("pidns") != here["pidns"]
            or owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid()):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after the command name, which may hold spaces
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")


class LeaseManager:
    """Claims, releases and heartbeats the leases of one process on one store.

    Args:
        backend: the store's file backend.
        ttl: seconds without a heartbeat after which a lease is dead (default 120).
    """

    def __init__(self, backend: Backend, ttl: float = DEFAULT_TTL):
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self.backend = backend
        self.ttl = float(ttl)
        self._held: dict[str, tuple[str, dict]] = {}  # lease id -> (path, content)
        # Guards _held and is held while a lease file is rewritten or deleted: a heartbeat's rewrite never
        # lands after a release deleted the file (the lease would come back and hold its items for a TTL).
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _folder(self, stage: str, key: str) -> str:
        return self.backend.path(LEASES, stage, key)

    # ------------------------------------------------------------------ reading
    def leases(self, stage: str, key: str) -> list[LeaseInfo]:
        """Every readable lease of a stage output set (dead ones included)."""
        out = []
        folder = self._folder(stage, key)
        for name in self.backend.listdir(folder):
            if not name.endswith(".json") or is_temporary(name):
                continue
            try:
                data = self.backend.get(f"{folder}/{name}")  # other I/O errors propagate: never guess "dead"
            except FileNotFoundError:
                continue
            try:
                d = json.loads(data)
                out.append(LeaseInfo(name[:-5], dict(d["owner"]), tuple(d["items"]), float(d["heartbeat"]),
                                     float(d.get("ttl", self.ttl))))
            except Exception:  # noqa: BLE001 - unparsable lease: written atomically, so tampered: dead
                out.append(LeaseInfo(name[:-5], {}, (), 0.0, self.ttl))
        return out

    def live(self, stage: str, key: str, exclude: str | None = None) -> list[LeaseInfo]:
        """Live leases (heartbeat within TTL); dead ones are deleted (taken over)."""
        now = time.time()
        out = []
        for info in self.leases(stage, key):
            if info.lease_id == exclude:
                continue
            if info.alive(now):
                out.append(info)
            else:
                if info.lease_id not in self._held:
                    self.backend.delete(f"{self._folder(stage, key)}/{info.lease_id}.json")
        return out

    def busy_items(self, stage: str, key: str) -> dict[str, LeaseInfo]:
        """Items held by a live lease of another claim."""
        return {i: info for info in self.live(stage, key) if info.lease_id not in self._held for i in info.items}

    # ------------------------------------------------------------------ claiming
    def claim(self, stage: str, key: str, items: Sequence[str], run_id: str = "") -> Claim:
        """Claim ``items`` for this process. Raises ``LeaseError`` if the leases cannot be read or written."""
        try:
            return self._claim(stage, key, items, run_id)
        except OSError as e:
            raise LeaseError(f"cannot write lease in {self._folder(stage, key)}: {e}") from e

    def _claim(self, stage: str, key: str, items: Sequence[str], run_id: str) -> Claim:
        claim = Claim(None, stage, key)
        others = self.busy_items(stage, key)
        claim.busy = {i: others[i] for i in items if i in others}
        mine = [i for i in items if i not in others]
        if not mine:
            return claim
        lease_id = new_id()
        path = f"{self._folder(stage, key)}/{lease_id}.json"
        content = {"owner": owner_record(run_id), "items": mine, "created": time.time(), "heartbeat": time.time(),
                   "ttl": self.ttl}
        self.backend.put_if_absent(path, json.dumps(content).encode(), durable=False)  # no fsync: see the module docstring
        with self._lock:
            self._held[lease_id] = (path, content)
        self._ensure_thread()
        # second look: an earlier claim (smaller id) that overlaps keeps its items. A later one (larger id) that
        # still lists an item may have looked before this lease was written and kept it: keep such an item only
        # once that lease has dropped it (it gives it up when its own look sees this lease), else give it up
        lost: dict[str, LeaseInfo] = {}
        for look in range(len(SETTLE_WAITS) + 1):
            lost, contested = {}, {}
            for info in self.live(stage, key, exclude=lease_id):
                if info.lease_id not in self._held:
                    for i in info.items:
                        if i in mine:
                            (lost if info.lease_id < lease_id else contested)[i] = info
            if not contested or look == len(SETTLE_WAITS):
                break
            time.sleep(SETTLE_WAITS[look])
        lost.update(contested)
        if lost:
            mine = [i for i in mine if i not in lost]
            claim.busy.update(lost)
            if mine:
                self._rewrite(lease_id, items=mine)
            else:
                self.release(Claim(lease_id, stage, key))
                return claim
        claim.lease_id = lease_id
        claim.mine = mine
        return claim

    def release(self, claim: Claim) -> None:
        """Give a claim up (its lease file is deleted)."""
        if claim.lease_id is None:
            return
        with self._lock:
            held = self._held.pop(claim.lease_id, None)
            if held is not None:
                try:
                    self.backend.delete(held[0])
                except OSError as e:  # the lease then expires after its TTL
                    log.warning("cannot delete lease %s: %s", held[0], e)

    def _rewrite(self, lease_id: str, items: Iterable[str] | None = None) -> None:
        with self._lock:
            held = self._held.get(lease_id)
            if held is None:
                return
            path, content = held
            content = dict(content, heartbeat=time.time())
            if items is not None:
                content["items"] = list(items)
            self._held[lease_id] = (path, content)
            self.backend.put_atomic(path, json.dumps(content).encode(), durable=False)

    # ------------------------------------------------------------------ heartbeat
    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=_beat, args=(weakref.ref(self), self._stop, self.ttl / 4),
                                        name="ovseg-lease-heartbeat", daemon=True)
        self._thread.start()

    def heartbeat(self) -> None:
        """Refresh every held lease now (the heartbeat thread calls this every TTL/4)."""
        for lease_id in list(self._held):
            try:
                self._rewrite(lease_id)
            except OSError as e:
                log.warning("cannot refresh lease %s: %s (it expires after %.0f s)", lease_id, e, self.ttl)

    def close(self) -> None:
        self._stop.set()


def _beat(ref: "weakref.ref[LeaseManager]", stop: threading.Event, period: float) -> None:
    while not stop.wait(period):
        manager = ref()
        if manager is None:
            return
        manager.heartbeat()
        del manager
