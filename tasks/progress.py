"""Progress of long loops as plain log lines (``ovseg.progress``): done / total, rate, elapsed, time left, ETA.

Used where no terminal bar can be drawn: by ``flows.logs.progress_bar`` when stderr is not a
terminal (log files, schedulers: no ``\\r``), and inside stages whose one item is a long loop
(``bank_index`` reads the keys of every image of a bank). The interval is the run's
``runner.progress_seconds`` (``RunSettings.progress_seconds`` in tasks).
"""

from __future__ import annotations

import logging
import time

PLAIN_PROGRESS_SECONDS = 60.0  # default seconds between two progress lines of one stage (runner.progress_seconds)
progress_log = logging.getLogger("ovseg.progress")


class PlainProgress:
    """Progress as plain log lines, for output that is not a terminal (no ``\\r``, no bar).

    Same calls as the part of tqdm ovseg uses: ``update(n)``, ``close()``, a context manager.
    A line ``<desc>: <done>/<total> img (<pct>%), <rate> img/s, elapsed <t>, about <eta> left (ETA HH:MM UTC)``
    is logged at INFO on ``ovseg.progress`` at most every ``interval`` seconds (never after the last
    item: the stage's own summary line follows it). The rate is the mean since the start (model
    loading included), so the first lines of a stage overestimate what is left.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", interval: float = PLAIN_PROGRESS_SECONDS):
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, float(interval)
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            elapsed = now - self.start
            rate = self.n / max(elapsed, 1e-9)
            left = (self.total - self.n) / rate if rate > 0 else float("inf")
            end = "?" if left == float("inf") else time.strftime("%H:%M UTC", time.gmtime(time.time() + left))
            progress_log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, elapsed %s, about %s left (ETA %s)", self.desc, self.n,
                              self.total, self.unit, 100.0 * self.n / max(self.total, 1), rate, self.unit,
                              _duration(elapsed), _duration(left), end)

    def close(self) -> None:
        pass

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
