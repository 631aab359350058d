"""The report's memory-bank facts: which bank each prediction used, with what settings, and how well it supported it.

Read-only, from the store alone (issue 22, docs/report.md "Memory banks"):

- the ``reconstruction`` stage key of a prediction (``flows.report_data.reconstruction_key``, the walk the
  method config column follows too): its
  ``params.bank`` (``tasks.bank_params.BankUse``: bank name, K, alpha, DMCE weight) and its
  ``bank_index`` upstream key;
- the ``bank_index`` item's attrs (images and regions indexed, index kind) and the stage key of
  its ``bank_aux_values`` input (DMCE's auxiliary CLIP);
- each reconstruction item's attrs ``bank``: ``{name, regions, without_support}`` (the regions
  queried and those whose K neighbours were all missing, which keep their own logits).

A prediction made without a bank gives None (the page shows "–").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flows.report_data import reconstruction_key, stage_attrs_or_empty, stage_key_of
from ovseg_core.bank.config import FusionConfig, SearchConfig
from storage.store import Store
from tasks.bank_params import BANK_ITEM


@dataclass
class BankUsed:
    """The bank a method's predictions of one dataset retrieved from."""

    name: str
    index_key: str  # the bank_index stage key (a grown bank is a new key)
    images: int | None  # images indexed; None = index item unreadable
    regions: int | None  # regions indexed
    k: int  # neighbours retrieved per region
    alpha: float  # weight of the image's own logits in the fusion
    aux_weight: float  # DMCE: the auxiliary store's weight in the support
    aux_clip: str | None  # DMCE's auxiliary CLIP; None = no auxiliary store (DMCE off)
    queried: int = 0  # regions queried, over the images whose attrs were read
    without_support: int = 0  # of them, regions without any neighbour (own logits kept)
    images_read: int = 0  # reconstruction items whose bank attrs were read
    imported: bool = False  # the authors' prebuilt files (``ovseg bank import``): no images, rows only

    @property
    def share_without_support(self) -> float | None:
        return self.without_support / self.queried if self.queried else None

    def summary(self) -> str:
        """One line for the scores table."""
        size = ("index unreadable" if self.images is None
                else f"imported, {self.regions} regions" if self.imported
                else f"{self.images} images, {self.regions} regions")
        aux = f"aux {self.aux_weight:g} ({self.aux_clip})" if self.aux_clip else "no DMCE"
        share = self.share_without_support
        support = ("without support: –" if share is None else
                   f"without support {100.0 * share:.1f}% ({self.without_support}/{self.queried} regions,"
                   f" {self.images_read} images)")
        return (f"{self.name} ({size}; index {self.index_key[:12]}) · K {self.k} · α {self.alpha:g} · {aux}"
                f" · {support}")


def _stage_key(store: Store, stage: str, key: str) -> dict[str, Any]:
    return stage_key_of(stage_attrs_or_empty(store, stage, key))


def bank_used(store: Store, stage: str, key: str, items: Iterable[str] | None = None) -> BankUsed | None:
    """The bank behind a prediction (``stage`` / ``key``), with the support counts of ``items`` (None: every
    complete reconstruction item); None when the prediction used no bank."""
    rec = reconstruction_key(store, stage, key)
    if rec is None:
        return None
    sk = _stage_key(store, "reconstruction", rec)
    use = (sk.get("params") or {}).get("bank")
    index_key = (sk.get("upstream") or {}).get("bank_index")
    if not isinstance(use, Mapping) or not isinstance(index_key, str):
        return None
    search, fusion = use.get("search") or {}, use.get("fusion") or {}
    try:
        attrs = store.item_attrs("bank_index", index_key, BANK_ITEM)
        images, regions, imported = int(attrs["images"]), int(attrs["regions"]), bool(attrs.get("imported"))
    except Exception:  # noqa: BLE001 - a removed or damaged index: the settings are still known
        images = regions = None
        imported = False
    aux_key = (_stage_key(store, "bank_index", index_key).get("upstream") or {}).get("bank_aux_values")
    aux_clip = (_stage_key(store, "bank_values", aux_key).get("params") or {}).get("backbone") if aux_key else None
    out = BankUsed(str(use.get("bank")), index_key, images, regions, int(search.get("k", SearchConfig.k)),
                   float(fusion.get("alpha", FusionConfig.alpha)),
                   float(fusion.get("aux_weight", FusionConfig.aux_weight)),
                   aux_clip or (str(aux_key)[:12] if aux_key else None), imported=imported)
    try:
        ids = sorted(store.complete_items("reconstruction", rec)) if items is None else list(items)
    except Exception:  # noqa: BLE001 - unreadable completion records: no support counts
        ids = []
    for iid in ids:
        got = item_bank(store, rec, iid)
        if got is not None:
            out.queried += got[1]
            out.without_support += got[2]
            out.images_read += 1
    return out


def item_bank(store: Store, rec_key: str, item: str) -> tuple[str, int, int] | None:
    """``(bank, regions queried, regions without support)`` of one reconstruction item; None when it records no
    bank."""
    try:
        rec = store.item_attrs("reconstruction", rec_key, item).get("bank")
    except Exception:  # noqa: BLE001 - missing or damaged item: noted by the prediction panel
        return None
    if not isinstance(rec, Mapping):
        return None
    return str(rec.get("name", "?")), int(rec.get("regions", 0)), int(rec.get("without_support", 0))


def sample_record(store: Store, stage: str, key: str, item: str) -> str:
    """One line under a sample image: the bank its prediction used and the regions it left without support."""
    rec = reconstruction_key(store, stage, key)
    got = item_bank(store, rec, item) if rec is not None else None
    if got is None:
        return ""
    name, queried, without = got
    share = f"{100.0 * without / queried:.1f}%" if queried else "–"
    return f"bank {name}: {without} of {queried} regions without support ({share})"
