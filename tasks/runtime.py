"""What every stage task shares: the per-batch item loop and the per-worker model cache.

A stage task receives a batch of items (images, or one vocabulary), and for each item that is
not complete in the store: claims it (so two runs on one store do not compute the same
output), computes it by calling ``ovseg_core``, writes it whole and marks it complete, and
records failures without stopping the batch. The store, not Prefect's result cache, says what
is done.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from storage.keys import StageKey
from storage.store import Store

log = logging.getLogger("ovseg.tasks")

ComputeFn = Callable[["StageContext", Mapping[str, Any]], tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]


@dataclass(frozen=True)
class StageSpec:
    """One stage output set: its key and what it reads, without a store (the flow's graph node).

    Attributes:
        stage_key: the stage's key (params, upstream keys, code version, weights identity).
        upstream: ``{stage name: StageKey}`` of the stages it reads.
        device: torch device string for model stages.
        dtype: torch dtype name for model stages (``float32``, ``bfloat16``, ``float16``).
        extra: resolved run settings that do not change outputs (window batch, weights folder).
    """

    stage_key: StageKey
    upstream: Mapping[str, StageKey] = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.stage_key.stage

    @property
    def key(self) -> str:
        return self.stage_key.key

    @property
    def params(self) -> Mapping[str, Any]:
        return self.stage_key.params


@dataclass(frozen=True)
class StageContext(StageSpec):
    """A ``StageSpec`` bound to a store: everything a stage task needs besides its items; picklable for Dask.

    Attributes:
        store_location: the store's path or URL (each worker opens it itself).
    """

    store_location: str = ""

    @classmethod
    def bind(cls, spec: StageSpec, store_location: str) -> "StageContext":
        """The context of a graph node on a store."""
        return cls(spec.stage_key, dict(spec.upstream), spec.device, spec.dtype, dict(spec.extra), store_location)

    def store(self) -> Store:
        return open_store(self.store_location)

    def backbone(self, name: str):
        """A backbone by name, loaded once per worker (weights from ``extra['weights_dir']`` or $OVSEG_WEIGHTS)."""
        return get_backbone(name, self.device, self.dtype, self.extra.get("weights_dir"))

    def read_upstream(self, name: str, item: str, arrays: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Read an upstream stage's complete output for one item."""
        up = self.upstream[name]
        return self.store().read_item(up.stage, up.key, item, arrays)


@dataclass
class ItemResult:
    """Outcome of one item in a batch."""

    item: str
    status: str  # "done" | "cached" | "failed" | "busy"
    seconds: float = 0.0
    error_type: str = ""
    error: str = ""


@lru_cache(maxsize=8)
def open_store(location: str) -> Store:
    """One ``Store`` object per location and process."""
    return Store(location)


_model_lock = threading.Lock()


@lru_cache(maxsize=8)
def _load_backbone_cached(name: str, device: str, dtype: str, weights_dir: str | None):
    import torch

    from ovseg_core.backbones import load_backbone

    return load_backbone(name, device=device, dtype=getattr(torch, dtype), weights_dir=weights_dir)


def get_backbone(name: str, device: str = "cpu", dtype: str = "float32", weights_dir: str | None = None):
    """Load a backbone once per worker process (thread-safe); later calls return the same object."""
    with _model_lock:
        return _load_backbone_cached(name, device, dtype, weights_dir)


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of the libraries that shape the outputs, recorded with every item and run."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ovseg", "torch", "torchvision", "open_clip_torch", "timm", "segment-anything", "numpy", "zarr",
                "scikit-learn", "scikit-image", "prefect"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def run_items(ctx: StageContext, items: Sequence[Mapping[str, Any]], compute: ComputeFn,
              chunk_first_axis: Sequence[str] = ()) -> list[ItemResult]:
    """Compute and store every item of a batch that is not complete yet.

    Args:
        ctx: the stage context.
        items: manifest rows (dicts with at least ``image_id``) or ``{"image_id": vocabulary id}``.
        compute: ``(ctx, item) -> (arrays, attrs)``; exceptions are recorded per item.
        chunk_first_axis: array names stored with one chunk per leading index (per window).
    Returns:
        one ``ItemResult`` per item.
    """
    store = ctx.store()
    done = store.complete_items(ctx.stage, ctx.key)
    versions = software_versions()
    results: list[ItemResult] = []
    for item in items:
        iid = str(item["image_id"])
        if iid in done:
            results.append(ItemResult(iid, "cached"))
            continue
        if not store.try_claim(ctx.stage, ctx.key, iid):
            results.append(ItemResult(iid, "busy", error="another process is computing it"))
            continue
        t0 = time.perf_counter()
        try:
            if store.is_complete(ctx.stage, ctx.key, iid):  # finished by another process meanwhile
                results.append(ItemResult(iid, "cached"))
                continue
            arrays, attrs = compute(ctx, item)
            seconds = time.perf_counter() - t0
            store.write_item(
                ctx.stage_key,
                iid,
                arrays,
                {**dict(attrs), "seconds": seconds, "software": versions, "random_weights": ctx.stage_key.is_random_weights},
                chunk_first_axis=chunk_first_axis,
            )
            results.append(ItemResult(iid, "done", seconds))
        except Exception as e:  # one bad image must not stop the run
            seconds = time.perf_counter() - t0
            log.warning("%s failed on %s: %s: %s", ctx.stage, iid, type(e).__name__, e)
            log.debug("%s", traceback.format_exc())
            results.append(ItemResult(iid, "failed", seconds, type(e).__name__, str(e)))
        finally:
            store.release(ctx.stage, ctx.key, iid)
    return results
