"""What one fused chain batch keeps in memory between its stages (``tasks.chain``).

A ``ChainMemory`` lives in one worker for one chain batch (a few images, several stages) and
holds two things:

- **values made from an image** (``made``): the decoded RGB, the float image, the resized,
  normalised and windowed crops of one window geometry, the windowed region map: the first
  loader that asks makes it, the later ones get the same object (so each image is decoded once
  per chain batch, and resized and windowed once per window geometry and normalisation);
- **the outputs the chain computed** (``keep`` / ``output``): each item's arrays exactly as the
  writer stored them, so the next stage reads them from here instead of the store
  (``StageContext.read_upstream``), and ``forget`` drops a node's outputs once no later stage
  of the chain reads them.

Callers must not modify what they get (the same objects go to every stage that asks). The
memory is never pickled: a chain batch makes its own on the worker.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np


class ChainMemory:
    """Per-chain-batch cache of image-derived values and of computed stage outputs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: dict[Hashable, Any] = {}
        self._outputs: dict[tuple[str, str], dict[str, dict[str, np.ndarray]]] = {}
        self.made_count: Counter = Counter()  # key kind ("rgb", "windows", ...) -> values made (not reused)

    def made(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The value under ``key`` (a tuple whose first element names its kind), made by ``make()`` on first use.

        A value whose ``make`` raised is not remembered (the next caller raises too, for its own item).
        """
        with self._lock:
            if key in self._made:
                return self._made[key]
        value = make()  # outside the lock: loaders of one chain run one at a time, and a decode can be slow
        with self._lock:
            self.made_count[key[0]] += 1
            return self._made.setdefault(key, value)

    def keep(self, ident: tuple[str, str], item: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Remember the arrays of ``item`` that node ``ident`` (stage, key) just stored."""
        with self._lock:
            self._outputs.setdefault(ident, {})[item] = dict(arrays)

    def output(self, ident: tuple[str, str], item: str, arrays: Sequence[str] | None = None
               ) -> dict[str, np.ndarray] | None:
        """The kept arrays of ``item`` of node ``ident`` (only ``arrays`` when given), or None when not kept."""
        with self._lock:
            got = self._outputs.get(ident, {}).get(item)
        if got is None:
            return None
        return dict(got) if arrays is None else {k: got[k] for k in arrays}

    def has(self, ident: tuple[str, str], item: str) -> bool:
        """Whether node ``ident`` has kept ``item``."""
        with self._lock:
            return item in self._outputs.get(ident, {})

    def drop(self, ident: tuple[str, str], item: str) -> None:
        """Forget one kept item (its pack was not committed: it is not an output)."""
        with self._lock:
            self._outputs.get(ident, {}).pop(item, None)

    def forget(self, ident: tuple[str, str]) -> None:
        """Forget every kept output of node ``ident``."""
        with self._lock:
            self._outputs.pop(ident, None)
