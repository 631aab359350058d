"""``bank_index`` (one item per bank) and the retrieval + fusion a ``reconstruction`` with a bank applies.

``bank_index``: the keys of every image of the bank (``bank_keys`` items), region ids from the
bank's append-only registry (``storage.bank``: new images appended sorted by image id, ids never
renumbered), then ``ovseg_core.bank.index.build_index`` with the bank's ``IndexConfig`` (the
authors': ``IndexIDMap2(IndexIVFPQ)``, nlist = 8 sqrt N, m 32, 8 bits, their metric quirk; an
exact flat index below 256 keys, or ``kind: flat`` / ``hnsw``). The item stores the serialised
index, the indexed region ids, the registry's ``(first id, count)`` per image and its image ids
in registry order (``images``: how retrieval finds a region's ``bank_values`` item); its attrs
the models and settings. A grown bank is a new index (its key hashes the set of images): with
``IndexConfig.extension == "add"`` (the reference, the default) the largest earlier index of the
bank with the same keys and settings gets the new keys added without retraining (``_extend``);
otherwise (``retrain``, a tiny flat bank reaching 256 keys, removed images) it is trained on all keys.

An image of the bank whose keys are missing (its stage failed in this run or earlier) fails the
item with the images named: a bank never leaves an image out silently. Unreadable files are
reported at ingest and are not bank images.

The item also writes each value store (main and DMCE's auxiliary) in region-id order (``_consolidate``,
``storage.bank_rows``: append-only segments; a grown bank writes its new regions' rows only) and lists the
segments in its attrs (``value_rows``).

Retrieval (``BankServing``, once per worker and index): the index read with
``index_from_bytes(reverse_map=False)``, the value rows read by id, only the retrieved rows, never a whole store:
a built bank's through its segments (``storage.bank_rows.SegmentRows``), an imported store's row file
(``storage.row_files.FileRows``), both by positioned reads (an index item written before the segments: the
images' items, ``storage.bank.StoreRows``), DMCE's
auxiliary values through the same ids and scored against the auxiliary CLIP's own text
embeddings. ``fuse_with_bank`` is the reconstruction's hook (``tasks.reconstruction._finish``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ovseg_core.bank.index import add_keys, build_index, index_from_bytes, index_to_bytes, plan_extension
from ovseg_core.bank.pooling import region_queries
from ovseg_core.bank.refine import RefineCodes
from ovseg_core.bank.retrieval import BankSupport, ValueStore, fuse_support, search_images
from ovseg_core.features.regions import resize_regions_nearest
from storage.bank import Registry, StoreRows, read_registry, write_registry
from storage.bank_rows import RowSegments, SegmentRows, consolidate_values
from storage.row_files import FileRows
from storage.keys import to_jsonable
from tasks.bank_params import BANK_ITEM, ImportedValuesParams
from tasks.progress import PlainProgress
from tasks.runtime import StageContext, open_store

log = logging.getLogger("ovseg.tasks")
Output = tuple[dict[str, np.ndarray], dict[str, Any]]


class BankImagesMissing(RuntimeError):
    """Images of a bank have no keys: the index would leave them out."""


def _regions_key(ctx: StageContext) -> str:
    return ctx.input_node("bank_keys").upstream["sam_masks"].key


def index_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of every image of the bank (``row["images"]``), checked against its values; missing ones are named."""
    store = ctx.store()
    images = list(row["images"])
    missing = []
    for role in ("bank_keys", "bank_values", "bank_aux_values"):
        node = ctx.node.upstream.get(role)
        done = store.state(node.stage, node.key).complete() if node is not None else set(images)
        missing += [i for i in images if i not in done and i not in missing]
    if missing:
        raise BankImagesMissing(f"bank {ctx.params.bank!r}: {len(missing)} of {len(images)} images have no bank_keys "
                                f"or bank_values output ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                                "their stages failed (see the run's failures): fix or remove those images, then rerun")
    keys = {}
    bar = PlainProgress(len(images), f"bank {ctx.params.bank}: bank_index reading keys",
                        interval=ctx.settings.progress_seconds)
    for i in images:
        got = ctx.read_upstream("bank_keys", {"image_id": i}, ["keys", "mask_ids"])
        values = [ctx.read_upstream("bank_values", {"image_id": i}, ["mask_ids"])["mask_ids"]]
        if "bank_aux_values" in ctx.node.upstream:
            values.append(ctx.read_upstream("bank_aux_values", {"image_id": i}, ["mask_ids"])["mask_ids"])
        if any(not np.array_equal(v, got["mask_ids"]) for v in values):  # the authors' region-count check
            raise ValueError(f"bank {ctx.params.bank!r}: image {i}: its values and keys pool other regions "
                             f"({[len(v) for v in values]} vs {len(got['mask_ids'])}); recompute with --force bank_values")
        keys[i] = got["keys"]
        bar.update(1)
    return {"images": images, "keys": keys}


def index_compute(ctx: StageContext, _: None, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """``index`` (FAISS bytes, uint8), ``region_ids (N,) int64``, ``registry (n_images, 2) int64`` (first id, count)."""
    p = ctx.params
    (inp,) = inputs
    store = ctx.store()
    regions_key = _regions_key(ctx)
    keys = inp["keys"]
    reg = read_registry(store, p.bank, regions_key).extended({i: int(k.shape[0]) for i, k in keys.items()})
    models = _models(ctx)
    write_registry(store, p.bank, regions_key, reg, {"models": models})
    pos = reg.position()
    order = sorted(keys, key=pos.__getitem__)  # registry order: ids ascending
    ids = np.concatenate([np.arange(reg.first[pos[i]], reg.first[pos[i]] + reg.count[pos[i]], dtype=np.int64)
                          for i in order]) if order else np.empty(0, np.int64)
    dim = next((int(k.shape[1]) for k in keys.values()), 0)
    stacked = np.concatenate([keys[i] for i in order]) if order else np.empty((0, dim), np.float16)
    if stacked.shape[0] == 0:
        raise ValueError(f"bank {p.bank!r}: its {len(order)} images have no region (every pixel unsegmented)")
    log.info("bank %s: indexing %d regions of %d images (%s)", p.bank, ids.size, len(order), p.index.kind)
    bank, n_trained, built = _extend(ctx, store, stacked, ids)
    if bank is None:
        bank, n_trained, built = build_index(stacked, ids, p.index), int(ids.size), "trained on all keys"
    attrs = {"bank": p.bank, "images": len(order), "regions": int(ids.size), "registry_regions": reg.n_regions,
             "kind": bank.kind, "metric": bank.metric, "nlist": bank.nlist, "ntotal": bank.ntotal,
             "n_trained": n_trained, "built": built, "models": models, "regions_key": regions_key}
    log.info("bank %s: index %s over %d regions of %d images", p.bank, bank.kind, bank.ntotal, len(order))
    attrs["value_rows"] = _consolidate(ctx, store, reg, order)
    blob = np.frombuffer(index_to_bytes(bank), dtype=np.uint8)
    names = np.frombuffer("\n".join(reg.images).encode(), dtype=np.uint8)  # registry order (no string arrays)
    refine = bank.refine.arrays() if bank.refine is not None else {}  # IndexConfig.refine_m: in-RAM re-ranking codes
    return [({"index": blob, "region_ids": ids, "registry": reg.to_array(), "images": names, **refine}, attrs)]


def _extend(ctx: StageContext, store: Any, keys: np.ndarray, ids: np.ndarray) -> tuple[Any, int, str]:
    """The reference's growth (``IndexConfig.extension == "add"``): the largest earlier index of this bank with the
    same keys and index settings whose regions are all still in the bank, with the new keys added (no retraining);
    ``(None, 0, "")`` when there is none or ``plan_extension`` says "rebuild" (a tiny flat bank reaching 256 keys,
    ``extension: retrain``)."""
    p, keys_key = ctx.params, ctx.input_node("bank_keys").key
    best = None
    for stage, key in store.stage_sets():
        if stage != "bank_index" or key == ctx.key or BANK_ITEM not in store.complete_items(stage, key):
            continue
        sk = store.stage_attrs(stage, key).get("stage_key", {})
        if sk.get("upstream", {}).get("bank_keys") != keys_key or sk.get("params", {}).get("bank") != p.bank \
                or sk.get("params", {}).get("index") != to_jsonable(p.index):
            continue
        n = int(store.item_attrs(stage, key, BANK_ITEM).get("regions", 0))
        if best is None or n > best[1]:
            best = (key, n)
    if best is None:
        return None, 0, ""
    arrays = store.read_item("bank_index", best[0], BANK_ITEM, ["index", "region_ids"])
    old = arrays["region_ids"]
    n_trained = int(store.item_attrs("bank_index", best[0], BANK_ITEM).get("n_trained", old.size))
    bank = index_from_bytes(arrays["index"].tobytes())
    if not np.isin(old, ids).all() or plan_extension(bank, n_trained, int(ids.size), p.index) != "add":
        return None, 0, ""
    new = ~np.isin(ids, old)
    add_keys(bank, keys[new], ids[new])
    return bank, n_trained, f"{int(new.sum())} keys added to index {best[0]} (not retrained)"


def _consolidate(ctx: StageContext, store: Any, reg: Registry, present: Sequence[str]) -> dict[str, Any]:
    """Each value store of the bank in region-id order (``storage.bank_rows``): the segments already written are
    kept, the ids they lack appended; ``{role: RowSegments attrs}`` for the index item."""
    out = {}
    for role in ("bank_values", "bank_aux_values"):
        node = ctx.node.upstream.get(role)
        if node is None:
            continue
        rs, written = consolidate_values(store, node.stage, node.key, ctx.params.bank, _regions_key(ctx), reg.images,
                                         reg.first, reg.count, present)
        log.info("bank %s: %s rows in region-id order: %d segment(s), %d rows written", ctx.params.bank, role,
                 len(rs.segments), written)
        out[role] = rs.to_attrs()
    return out


def _models(ctx: StageContext) -> dict[str, Any]:
    vals = {role: ctx.node.upstream[role].params.backbone for role in ("bank_values", "bank_aux_values")
            if role in ctx.node.upstream}
    keys = ctx.input_node("bank_keys").upstream["vfm_features"].params.backbone
    return {"values": vals.get("bank_values"), "aux_values": vals.get("bank_aux_values"), "keys": keys}


# ----------------------------------------------------------------------------- retrieval + fusion
@dataclass
class BankServing:
    """What a worker holds to retrieve from one bank: the index (the only bank structure in RAM) and row readers."""

    index: Any  # ovseg_core.bank.index.BankIndex
    values: SegmentRows | FileRows | StoreRows
    aux_values: SegmentRows | FileRows | StoreRows | None
    lock: threading.Lock  # a BankIndex search is not thread-safe (held by retrieve_batch only)


def _rows(ctx: StageContext, store: Any, role: str, images: Sequence[str], registry: np.ndarray,
          attrs: Mapping[str, Any]) -> SegmentRows | FileRows | StoreRows | None:
    index = ctx.input_node("bank_index")
    node = index.upstream.get(role)
    if node is None:
        return None
    if isinstance(node.params, ImportedValuesParams):  # one row file (``ovseg bank import``)
        return FileRows(store, node.stage, node.key)
    segments = (attrs.get("value_rows") or {}).get(role)
    if segments is not None:  # the values in region-id order, written by the index item (``storage.bank_rows``)
        return SegmentRows(store, RowSegments.from_attrs(segments), (index.stage, index.key, BANK_ITEM))
    # an index item written before the row segments: the per-image items (``--force bank_index`` writes segments)
    first = next((i for i, c in enumerate(registry[:, 1]) if c > 0), None)
    dim = store.read_item(node.stage, node.key, images[first], ["values"])["values"].shape[1] if first is not None else 0
    return StoreRows(store, node.stage, node.key, images, registry[:, 0], registry[:, 1], dim)


_SERVING: dict[tuple[str, str], BankServing] = {}  # one per worker process, store and index key
_SERVING_LOCK = threading.Lock()


def bank_serving(ctx: StageContext, arrays: Mapping[str, np.ndarray]) -> BankServing:
    """The worker's ``BankServing`` of the node's ``bank_index`` input (``arrays``: its item), made once per process."""
    key = ctx.input_node("bank_index").key
    with _SERVING_LOCK:
        got = _SERVING.get((ctx.settings.store_location, key))
        if got is None:
            store = open_store(ctx.settings.store_location, ctx.settings.lease_ttl)
            images = image_names(arrays)
            index = index_from_bytes(arrays["index"].tobytes(), reverse_map=False)
            if "refine_codes" in arrays:  # IndexConfig.refine_m (SearchConfig.rerank_with "codes")
                index.refine = RefineCodes.from_arrays(arrays)
            attrs = store.item_attrs("bank_index", key, BANK_ITEM)
            got = BankServing(index, _rows(ctx, store, "bank_values", images, arrays["registry"], attrs),
                              _rows(ctx, store, "bank_aux_values", images, arrays["registry"], attrs), threading.Lock())
            _SERVING[(ctx.settings.store_location, key)] = got
    return got


def image_names(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The registry's image ids of an index item, in registry order."""
    raw = arrays["images"].tobytes().decode()
    return raw.split("\n") if raw else []


@dataclass(frozen=True)
class Retrieved:
    """One image's regions and their retrieved bank regions (VISR steps 1-2)."""

    region_ids: np.ndarray  # (R,) int64 ids of the region map at the network-input size, ascending
    labels: np.ndarray  # (h, w) int64 index into region_ids of each pixel
    neighbours: np.ndarray  # (R, K) int64 bank region ids, nearest first, -1 = none


def retrieve_batch(ctx: StageContext, bank: Mapping[str, np.ndarray],
                   images: Sequence[tuple[tuple[int, int], np.ndarray, torch.Tensor]]) -> list[Retrieved]:
    """CorrCLIPv2's retrieval for a stage batch: each image's region queries, all searched in one call.

    ``images``: per image ``(hw, region_ids, vfm_map)``: the network-input size ``(h, w)``, its region map at
    original size (nearest-resized to ``hw``, every id a query, the unsegmented one included) and its VFM map
    ``(C, gh, gw)``. One search call reads the index's centroids once per batch; every image gets the neighbours
    a search of its own regions returns.
    """
    serving = bank_serving(ctx, bank)
    pooled = [region_queries(vfm_map.float().cpu(), np.asarray(resize_regions_nearest(np.asarray(ids), hw)))
              for hw, ids, vfm_map in images]
    with serving.lock:
        found = search_images([q for _, _, q in pooled], serving.index, ctx.params.bank.search)
    return [Retrieved(ids, labels, n) for (ids, labels, _), n in zip(pooled, found)]


def fuse_with_bank(ctx: StageContext, bank: Mapping[str, np.ndarray], own: torch.Tensor, retrieved: Retrieved,
                   text: torch.Tensor, aux_text: torch.Tensor | None) -> tuple[torch.Tensor, BankSupport]:
    """CorrCLIPv2's VISR (+ DMCE) on one image's window-averaged cosine logits ``own (Q, h, w)``.

    ``bank``: the ``bank_index`` item (``ctx.read_shared("bank_index", BANK_ITEM)``); ``retrieved``: the image's
    :func:`retrieve_batch` entry; ``text`` / ``aux_text``: ``(Q, D)`` unit text embeddings of the method's CLIP
    and of DMCE's auxiliary CLIP (None: no DMCE).
    """
    use = ctx.params.bank
    serving = bank_serving(ctx, bank)
    stores = [ValueStore(serving.values, text.float().cpu())]
    if serving.aux_values is not None and aux_text is not None:
        stores.append(ValueStore(serving.aux_values, aux_text.float().cpu()))
    # no lock: the search is done (retrieve_batch); value reads are positioned or checked store reads
    return fuse_support(own.cpu(), retrieved.region_ids, retrieved.labels, retrieved.neighbours, stores, use.fusion)


def registry_of(arrays: Mapping[str, np.ndarray]) -> Registry:
    """The registry stored with an index item (``ovseg bank ls``, tests)."""
    reg = arrays["registry"]
    return Registry(tuple(image_names(arrays)), tuple(int(v) for v in reg[:, 0]), tuple(int(v) for v in reg[:, 1]))
