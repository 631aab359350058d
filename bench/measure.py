"""Measurement helpers of the benchmark: RSS sampling, machine facts, matmul rate, FLOP counts, decode counts."""

from __future__ import annotations

import importlib
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class RssSampler:
    """Samples this process's resident set size (and its children's) from a background thread.

    Use as a context manager; ``samples`` holds ``(unix time, own rss bytes, children rss bytes,
    own cpu seconds user + system)``. Timestamps use ``time.time()``, the clock of
    ``StageReport.started`` / ``ended``.
    """

    interval: float = 0.05  # seconds between samples
    children_every: int = 20  # children's RSS (a /proc scan) only every this many samples, to keep the sampler cheap
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        proc = psutil.Process()
        n = 0
        while not self._stop.is_set():
            self.sample(proc, with_children=n % self.children_every == 0)
            n += 1
            self._stop.wait(self.interval)

    def sample(self, proc: psutil.Process | None = None, with_children: bool = True) -> None:
        """Record one sample now (children's RSS 0 when ``with_children`` is false)."""
        proc = proc or psutil.Process()
        children = 0
        for child in proc.children(recursive=True) if with_children else ():
            try:
                children += child.memory_info().rss
            except psutil.Error:
                pass
        cpu = proc.cpu_times()
        self.samples.append((time.time(), proc.memory_info().rss, children, cpu.user + cpu.system))

    def __enter__(self) -> "RssSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        """Largest own RSS among samples in ``[start, end]`` (the whole run when None).

        An interval shorter than the sampling interval holds no sample: the samples just before
        and after it bound its RSS, and the larger is used. 0 only without any sample.
        """
        lo = float("-inf") if start is None else start
        hi = float("inf") if end is None else end
        inside = [rss for t, rss, _, _ in self.samples if lo <= t <= hi]
        if inside:
            return max(inside)
        before = [s for s in self.samples if s[0] < lo]
        after = [s for s in self.samples if s[0] > hi]
        around = ([max(before)[1]] if before else []) + ([min(after)[1]] if after else [])
        return max(around, default=0)

    def children_peak(self) -> int:
        """Largest RSS summed over child processes (the Prefect ephemeral server)."""
        return max((c for _, _, c, _ in self.samples), default=0)

    def cpu_seconds(self, start: float, end: float) -> float:
        """This process's CPU seconds (all threads) between the samples nearest to ``start`` and ``end``."""
        if not self.samples:
            return 0.0

        def at(t: float) -> float:
            return min(self.samples, key=lambda s: abs(s[0] - t))[3]

        return at(end) - at(start)


def wait_quiet(threshold: float = 10.0, poll: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until this process's children (the Prefect server) use < ``threshold`` % CPU; seconds waited.

    After a flow run the ephemeral server keeps processing events for a while; on a 2-core
    machine that would slow whatever is timed next.
    """
    t0 = time.perf_counter()
    proc = psutil.Process()
    while time.perf_counter() - t0 < timeout:
        children = proc.children(recursive=True)
        for c in children:
            try:
                c.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(poll)
        busy = 0.0
        for c in children:
            try:
                busy += c.cpu_percent(None)
            except psutil.Error:
                pass
        if busy < threshold:
            break
    return time.perf_counter() - t0


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """Cores, threads, CPU model, memory and library versions of this machine."""
    import numpy as np

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_1min_at_start": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Median float32 ``torch.mm`` rate of two ``(n, n)`` matrices on this machine, in GFLOP/s (2 n^3 per mm)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and kernel selection
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    rates.sort()
    return rates[len(rates) // 2]


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of the aten ops run by ``fn()`` (``torch.utils.flop_counter``; matmuls, convs, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def median(values: Sequence[float | None]) -> float | None:
    """Median of the non-None values (None when there are none)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return float(vals[mid]) if len(vals) % 2 else float(0.5 * (vals[mid - 1] + vals[mid]))


class DecodeCounter:
    """Counts calls of the real decode functions: ingest's and the stages' image and ground-truth reads."""

    PLACES = (("storage.ingest", "load_rgb", "ingest_image"), ("storage.ingest", "load_label", "ingest_gt"),
              ("tasks.common", "load_rgb", "stage_image"), ("tasks.scoring", "load_label", "stage_gt"))

    def __init__(self) -> None:
        self.counts = dict.fromkeys((tag for _, _, tag in self.PLACES), 0)
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "DecodeCounter":
        for mod_name, fn, tag in self.PLACES:
            mod = importlib.import_module(mod_name)
            real = getattr(mod, fn)

            def counted(*args, _real=real, _tag=tag, **kwargs):
                self.counts[_tag] += 1
                return _real(*args, **kwargs)

            self._saved.append((mod, fn, real))
            setattr(mod, fn, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for mod, fn, real in self._saved:
            setattr(mod, fn, real)
