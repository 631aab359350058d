"""``ovseg bank import EXPERIMENT``: the authors' prebuilt bank files into the store, streamed and checked.

For each ``banks[]`` entry with ``imported: {values: [...], index: ...}``:

1. every ``{bank}_{encoder}.pt`` value store: ``read_pt_layout`` (``torch.load(weights_only=True,
   map_location="meta")``: the pickle only, no tensor bytes), ``check_pt_layout`` (one ``[N, D]`` fp16
   tensor, the same N for every store), then rows streamed by positioned reads (``iter_pt_rows``, 64k-row
   chunks) into the ``bank_values`` output's row file (``storage.row_files.write_row_file``: one contiguous
   file and an item ``rows`` with each row's CRC-32; region id = row): nothing holds a whole store; a rerun
   after a kill skips the stores already complete and copies the interrupted one again;
2. the ``{bank}_{vfm}.faiss`` index: ``index_from_file``, ``check_id_coverage`` (every row 0..N-1 indexed
   exactly once), then one ``bank_index`` item: the index bytes, its ids, the registry (one entry) and the
   provenance (file names, sizes, sha256, the CLIPs named by the experiment) in its attrs.

Each output (a value store's ``rows`` item, the ``bank_index`` item) is written under a lease (``_held``): a
concurrent import of the same files waits for it (then finds it complete), and the holder first removes what a
killed import of that output left (``storage.maintenance.clear_dead_writes``: a row file's temporary, up to a
whole store, and the index pack's), which without the lease could be another live import's file.

The outputs are those of the experiment's nodes (``flows.bank_graph.imported_index_node``), so a
``corrclipv2`` method with ``params.bank`` reads them like a built bank's (``tasks.bank_index``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flows.bank_graph import imported_index_node
from flows.config import BankEntry, Experiment
from ovseg_core.bank.authors_format import check_id_coverage, check_pt_layout, iter_pt_rows, read_pt_layout
from ovseg_core.bank.index import index_from_file
from storage.maintenance import clear_dead_writes
from storage.row_files import ROWS, write_row_file
from storage.store import Store
from tasks.bank_params import BANK_ITEM
from tasks.runtime import StageNode

log = logging.getLogger("ovseg.flows")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _held(store: Store, stage: str, key: str, item: str) -> Iterator[None]:
    """This process's lease on ``item`` of ``(stage, key)`` while it writes it: waits while another live process
    holds it (at most the lease TTL after that one stops); then removes what dead writers of the set left."""
    poll, waiting = min(2.0, store.leases.ttl / 10), False
    while not (claim := store.leases.claim(stage, key, [item], run_id="bank import")).mine:
        if not waiting:
            log.info("%s/%s/%s is being written by %s: waiting for it", stage, key, item, claim.busy[item].describe())
            waiting = True
        time.sleep(poll)
    try:
        freed = clear_dead_writes(store, stage, key)
        if freed:
            log.info("%s/%s: removed %d bytes a killed import left", stage, key, freed)
        yield
    finally:
        store.leases.release(claim)


def import_values(store: Store, node: StageNode, path: str, rows: int | None) -> tuple[int, int]:
    """Stream one ``.pt`` store into ``node``'s row file; returns ``(N, D)``. ``rows``: N the other stores have."""
    with open(path, "rb") as f:
        layout = read_pt_layout(f)
        check_pt_layout(layout, rows=rows)
        with _held(store, node.stage, node.key, ROWS):
            if ROWS not in store.complete_items(node.stage, node.key):
                write_row_file(store, node.stage_key, (chunk for _, chunk in iter_pt_rows(f, layout)),
                               {"source": Path(path).name})
    return layout.rows, layout.dim


def import_bank(exp: Experiment, b: BankEntry, store: Store) -> dict[str, Any]:
    """Import one bank's files into ``store`` (see the module docstring); returns the index item's attrs."""
    if b.imported is None:
        raise ValueError(f"banks[{b.name}] has no imported: files; it is built from its images by ovseg run")
    node = imported_index_node(exp, b)
    value_nodes = [node.upstream[r] for r in ("bank_values", "bank_aux_values") if r in node.upstream]
    if BANK_ITEM in store.complete_items(node.stage, node.key) and all(
            ROWS in store.complete_items(v.stage, v.key) for v in value_nodes):
        log.info("bank %s: already imported (key %s)", b.name, node.key)
        return store.item_attrs(node.stage, node.key, BANK_ITEM)
    n_rows, files = None, []
    for vnode, path in zip(value_nodes, b.imported.values):
        n_rows, dim = import_values(store, vnode, path, n_rows)
        files.append({"file": Path(path).name, "bytes": Path(path).stat().st_size, "sha256": _sha256(path),
                      "rows": n_rows, "dim": dim, "clip": vnode.params.backbone})
        log.info("bank %s: %s imported (%d rows of %d)", b.name, Path(path).name, n_rows, dim)
    with _held(store, node.stage, node.key, BANK_ITEM):
        if BANK_ITEM not in store.complete_items(node.stage, node.key):  # else another import wrote it meanwhile, or
            _write_index(store, node, b, value_nodes, n_rows, files)    # a value store was written again (damaged)
    return store.item_attrs(node.stage, node.key, BANK_ITEM)


def _write_index(store: Store, node: StageNode, b: BankEntry, value_nodes: list[StageNode], n_rows: int | None,
                 files: list[dict[str, Any]]) -> None:
    """The ``bank_index`` item of an imported bank: the authors' index, checked, and the provenance."""
    with open(b.imported.index, "rb") as f:
        bank = index_from_file(f)
    coverage = check_id_coverage(bank.ids(), int(n_rows or 0))
    if not coverage.complete:
        raise ValueError(f"banks[{b.name}].imported.index {b.imported.index}: its ids do not cover the {n_rows} store "
                         f"rows exactly once ({coverage.missing} rows missing, {coverage.duplicated} duplicated, "
                         f"{coverage.out_of_range} out of range); the files are not one bank")
    files.append({"file": Path(b.imported.index).name, "bytes": Path(b.imported.index).stat().st_size,
                  "sha256": _sha256(b.imported.index), "ntotal": bank.ntotal, "dim": bank.dim})
    registry = np.array([[0, int(n_rows)]], dtype=np.int64)  # one entry: region id = row of the row file
    names = np.frombuffer(ROWS.encode(), dtype=np.uint8)
    blob = np.frombuffer(Path(b.imported.index).read_bytes(), dtype=np.uint8)
    attrs = {"bank": b.name, "images": 0, "regions": int(n_rows), "registry_regions": int(n_rows), "kind": bank.kind,
             "metric": bank.metric, "nlist": bank.nlist, "ntotal": bank.ntotal, "imported": files,
             "models": {"values": value_nodes[0].params.backbone,
                        "aux_values": value_nodes[1].params.backbone if len(value_nodes) > 1 else None,
                        "keys": f"(authors' {Path(b.imported.index).name})"}}
    store.write_item(node.stage_key, BANK_ITEM, {"index": blob, "region_ids": bank.ids(), "registry": registry,
                                                 "images": names}, attrs)
    log.info("bank %s: index %s/%s over %d regions imported (key %s)", b.name, bank.kind, bank.metric, bank.ntotal,
             node.key)
