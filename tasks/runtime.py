"""What every stage shares: graph nodes, the run context, results, the per-worker model cache.

A ``StageNode`` is one stage output set of the experiment's graph: its stage name, typed
parameters, the nodes it reads (by role) and its weights identity; its key is computed from
those, so graph edges are declared once. A ``StageContext`` binds a node to the run settings
(store, device, window batch, ...) and is what a worker receives (picklable, for Dask).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch

from ovseg_core.backbones import load_backbone
from storage.keys import StageKey
from storage.store import Store
from tasks.progress import PLAIN_PROGRESS_SECONDS
from tasks.stages import STAGES, VOCAB_ITEM, InputError, get_stage

log = logging.getLogger("ovseg.tasks")


@dataclass(frozen=True, eq=False)
class StageNode:
    """One stage output set of an experiment's graph.

    Attributes:
        stage: stage name (a key of ``tasks.stages.STAGES``).
        params: the stage's typed parameters (``tasks.params``).
        code_version: the stage's code version (from the stage table).
        upstream: ``{role: node}`` of the outputs it reads.
        weights: identities of the model weights it uses, or None.
    """

    stage: str
    params: Any
    code_version: str
    upstream: Mapping[str, "StageNode"] = field(default_factory=dict)
    weights: Mapping[str, Any] | None = None
    persist: bool = True  # False: never written; computed on demand inside its consumers (not part of the key)
    inputs_dir: str | None = None  # where inputs outside the store live (pre-generated masks); not part of the key

    @cached_property
    def stage_key(self) -> StageKey:
        return StageKey(self.stage, self.params, {role: n.key for role, n in self.upstream.items()},
                        self.code_version, self.weights)

    @cached_property
    def key(self) -> str:
        """The stage key (a SHA-256 of the key payload: computed once per node, it is read per item and batch)."""
        return self.stage_key.key

    @cached_property
    def ident(self) -> tuple[str, str]:
        return self.stage, self.key

    @cached_property
    def random_weights(self) -> bool:
        """True when this output or anything it was computed from used random weights."""
        return self.stage_key.is_random_weights or any(n.random_weights for n in self.upstream.values())


@dataclass(frozen=True)
class RunSettings:
    """Settings of a run that do not change outputs (not hashed into keys)."""

    store_location: str
    device: str = "cpu"
    window_batch: int = 4  # windows per network forward (of one image: tasks.common.run_windows)
    weights_dir: str | None = None
    run_id: str = ""
    lease_ttl: float = 120.0
    prefetch: int = 4  # items decoded ahead of the computation
    write_queue: int = 4  # computed items waiting to be written
    # load and add items on a loader and a writer thread beside the compute ("on"), or in the compute thread
    # ("off": only the pack's commit runs on a thread); "auto": on for a CUDA device or an object store, off on a
    # CPU with a local store, where the two threads take cores from the compute's OpenMP threads (tasks.executor,
    # runner.io_threads, docs/banks.md 5)
    io_threads: str = "auto"
    progress_seconds: float = PLAIN_PROGRESS_SECONDS  # between two progress lines of a long loop (tasks.progress)


@dataclass(frozen=True)
class StageContext:
    """A node bound to the run settings: everything a stage batch needs besides its items."""

    node: StageNode
    settings: RunSettings
    dataset: str = ""
    # a fused chain batch's ``tasks.memory.ChainMemory`` (set on the worker by ``tasks.chain``; None otherwise):
    # decoded images and the outputs the chain just stored, read from memory instead of the store
    memory: Any = field(default=None, compare=False, repr=False)

    @property
    def stage(self) -> str:
        return self.node.stage

    @property
    def key(self) -> str:
        return self.node.key

    @property
    def params(self) -> Any:
        return self.node.params

    @property
    def device(self) -> str:
        """The torch device of this process: ``settings.device`` bound to one GPU per worker (``worker_device``)."""
        return worker_device(self.settings.device)

    def store(self) -> Store:
        return open_store(self.settings.store_location, self.settings.lease_ttl)

    def backbone(self, name: str, dtype: str = "float32"):
        """A backbone by name, loaded once per worker process."""
        return get_backbone(name, self.device, dtype, self.settings.weights_dir)

    def input_node(self, role: str) -> StageNode:
        """The node wired to the declared input ``role`` (``tasks.stages.Input``).

        Raises:
            InputError: the stage does not declare ``role``, or ``role`` is optional and this node
                was not wired with it (the method's graph holds none of its sources).
        """
        inp = get_stage(self.node.stage).input(role)
        try:
            return self.node.upstream[role]
        except KeyError:
            raise InputError(f"stage {self.node.stage!r} (key {self.node.key}): its {'' if inp.required else 'optional '}"
                             f"input {role!r} ({' or '.join(inp.sources)}) is not wired for this node; the method's "
                             "graph holds none of its sources") from None

    def read_upstream(self, role: str, row: Mapping[str, Any], arrays: Sequence[str] | None = None
                      ) -> dict[str, np.ndarray]:
        """A declared upstream output of one item (manifest ``row``): read, checked against its completion record,
        or, for a stage that is not persisted and has no stored copy, computed here by the stage's own steps.

        In a fused chain the output the chain just stored comes from memory: the same arrays the writer stored."""
        up = self.input_node(role)
        iid = str(row["image_id"])
        if self.memory is not None and (kept := self.memory.output(up.ident, iid, arrays)) is not None:
            return kept
        store = self.store()
        if up.persist or store.state(up.stage, up.key, refresh=False).pack_of(iid) is not None:
            return store.read_item(up.stage, up.key, iid, arrays)
        stage, ctx = STAGES[up.stage], StageContext(up, self.settings, self.dataset, self.memory)
        (out, _), = stage.compute(ctx, stage.models(ctx), [stage.load(ctx, row)])
        return {k: out[k] for k in arrays} if arrays is not None else dict(out)

    def read_shared(self, role: str, item: str = VOCAB_ITEM) -> dict[str, np.ndarray]:
        """A declared upstream per-vocabulary output, read once per worker."""
        up = self.input_node(role)
        return _read_shared(self.settings.store_location, self.settings.lease_ttl, up.stage, up.key, item)


@lru_cache(maxsize=16)
def _read_shared(location: str, ttl: float, stage: str, key: str, item: str) -> dict[str, np.ndarray]:
    return open_store(location, ttl).read_item(stage, key, item)


@dataclass
class ItemResult:
    """Outcome of one item in a batch."""

    item: str
    status: str  # "done" | "cached" | "failed" | "busy"
    seconds: float = 0.0
    error_type: str = ""
    error: str = ""


@dataclass
class BatchResult:
    """Outcome of one batch: per-item results, and a stage-wide failure (e.g. a backbone that cannot load)."""

    items: list[ItemResult]
    fatal: str = ""
    seconds: float = 0.0  # wall time of a fused chain node's part of its chain batch (0: not measured)
    # inputs not persisted that a fused chain computed in memory for this node's items (``tasks.chain``):
    # node ident -> the results of the items computed
    in_memory: dict[tuple[str, str], list[ItemResult]] = field(default_factory=dict)


@lru_cache(maxsize=8)
def open_store(location: str, lease_ttl: float = 120.0) -> Store:
    """One ``Store`` object per location and process (its completion state and leases are shared)."""
    return Store(location, lease_ttl=lease_ttl)


class BackboneLoadError(RuntimeError):
    """A backbone failed to load; every item of its stage fails with this error, once."""


_model_lock = threading.Lock()
_models: dict[tuple, Any] = {}


def get_backbone(name: str, device: str = "cpu", dtype: str = "float32", weights_dir: str | None = None):
    """Load a backbone once per worker process (thread-safe). A failure is remembered and re-raised."""
    ident = (name, device, dtype, weights_dir)
    with _model_lock:
        got = _models.get(ident)
        if got is None:
            try:
                got = load_backbone(name, device=device, dtype=getattr(torch, dtype), weights_dir=weights_dir)
            except Exception as e:  # noqa: BLE001 - remembered: the stage fails once, not per image
                got = BackboneLoadError(f"backbone {name} failed to load: {type(e).__name__}: {e}")
            _models[ident] = got
    if isinstance(got, BackboneLoadError):
        raise got
    return got


# --------------------------------------------------------------------------- device binding
_WORKER_SUFFIX = re.compile(r"(?:^|-)(\d+)$")


def worker_index(name: object) -> int | None:
    """The index of a Dask worker from its name, or None when the name carries none.

    ``LocalCluster`` names its workers ``0 .. n-1``; ``dask worker --name gpu --nworkers 4``
    names them ``gpu-0 .. gpu-3``; a name ending in ``-<digits>`` (or all digits) gives that
    number, any other name (the default: the worker's address) gives None.
    """
    if isinstance(name, bool):
        return None
    if isinstance(name, int):
        return name if name >= 0 else None
    m = _WORKER_SUFFIX.search(str(name))
    return int(m.group(1)) if m else None


def bind_device(requested: str, cuda_devices: int, index: int | None) -> str:
    """The device one worker process uses for ``device: requested``.

    Args:
        requested: the experiment's ``device`` (``auto``, ``cuda``, ``cuda:N``, ``cpu``, ``mps``).
        cuda_devices: CUDA devices visible to the process (``torch.cuda.device_count()``, which
            honours ``CUDA_VISIBLE_DEVICES``).
        index: the worker's index on its machine (``worker_index``), None outside a named worker.

    Returns:
        ``auto`` and ``cuda``: ``cuda:{index mod cuda_devices}`` (``cuda:0`` without an index), so
        workers 0..k-1 of a k-GPU machine each get their own GPU and a worker started with its
        own ``CUDA_VISIBLE_DEVICES=i`` uses that one; ``auto`` with no CUDA device: ``cpu``.
        An explicit ``cuda:N``, ``cpu`` or ``mps`` is returned unchanged.

    Raises:
        ValueError: ``cuda`` requested but no CUDA device is visible.
    """
    if requested not in ("auto", "cuda"):
        return requested
    if cuda_devices < 1:
        if requested == "auto":
            return "cpu"
        raise ValueError(f"device: 'cuda' but no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use device: auto to fall back to cpu")
    return f"cuda:{(index or 0) % cuda_devices}"


@lru_cache(maxsize=8)
def worker_device(requested: str) -> str:
    """``bind_device`` for this process, resolved once; says once per process where it runs.

    On a CUDA device the process's current device is set too, so stray ``"cuda"`` tensors land
    on the bound GPU.
    """
    if requested not in ("auto", "cuda"):
        return requested
    count = torch.cuda.device_count()
    name = _dask_worker_name()
    index = worker_index(name) if name is not None else None
    device = bind_device(requested, count, index)
    where = f"{'worker ' + str(name) if name is not None else 'process'} (pid {os.getpid()})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if device == "cpu":
        log.warning("device auto: no CUDA device visible to %s (CUDA_VISIBLE_DEVICES=%s); running on cpu", where,
                    visible)
        return device
    if index is None and name is not None and count > 1:
        log.warning("device %s: %s has no index in its name, so it uses %s like any other such worker; start "
                    "workers with `dask worker --name NAME --nworkers N` or give each its own CUDA_VISIBLE_DEVICES",
                    requested, where, device)
    torch.cuda.set_device(torch.device(device))
    log.info("device %s: %s bound to %s of %d visible (CUDA_VISIBLE_DEVICES=%s)", requested, where, device, count,
             visible)
    return device


def _dask_worker_name() -> object | None:
    """The name of the Dask worker running this code, or None outside a Dask worker.

    A Dask worker process has imported ``distributed`` already; other processes are not made to.
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker().name
    except ValueError:
        return None


@lru_cache(maxsize=1)
def software_versions() -> dict[str, str]:
    """Versions of the libraries that shape the outputs, recorded with every pack and run."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("ovseg", "torch", "torchvision", "open_clip_torch", "timm", "segment-anything", "sam2", "numpy",
                "zarr", "numcodecs", "scikit-learn", "scikit-image", "prefect"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out
