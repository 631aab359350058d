"""``ovseg bank ls`` (the store's memory banks: regions, images, bytes, models, settings) and ``ovseg bank import``."""

from __future__ import annotations

import argparse
from typing import Any

from flows.commands.common import human, read_only_store
from flows.config import load_experiment
from flows.summary import print_table
from storage.fserrors import StoreWriteError
from storage.keys import canonical_json
from storage.leases import LeaseError
from storage.store import Store
from tasks.bank_params import BANK_ITEM
from tasks.stages import Step

IMPORT_BANK = Step("flows.bank_import:import_bank")  # imported on first call: faiss and torch only for this command


def _bytes(store: Store, stage: str, key: str) -> int:
    return sum(size for _, size in store.backend.walk_files(store.stage_dir(stage, key)))


def bank_rows(store: Store) -> list[dict[str, Any]]:
    """One row per complete ``bank_index`` output set: what ``ovseg bank ls`` prints."""
    rows = []
    for stage, key in store.stage_sets():
        if stage != "bank_index" or BANK_ITEM not in store.complete_items(stage, key):
            continue
        attrs = store.item_attrs(stage, key, BANK_ITEM)
        sk = store.stage_attrs(stage, key).get("stage_key", {})
        upstream = sk.get("upstream", {})
        nbytes = _bytes(store, stage, key) + sum(_bytes(store, "bank_values" if r != "bank_keys" else "bank_keys", k)
                                                 for r, k in upstream.items())
        index = sk.get("params", {}).get("index", {})
        rows.append({"bank": attrs.get("bank", "?"), "key": key, "images": attrs.get("images", 0),
                     "regions": attrs.get("regions", 0), "bytes": nbytes, "kind": attrs.get("kind"),
                     "metric": attrs.get("metric"), "nlist": attrs.get("nlist"), "models": attrs.get("models", {}),
                     "settings": index, "random_weights": bool(store.stage_attrs(stage, key).get("random_weights")),
                     "imported": attrs.get("imported")})
    return sorted(rows, key=lambda r: (r["bank"], r["key"]))


def cmd_bank_import(args: argparse.Namespace) -> int:
    exp = load_experiment(args.experiment, overrides=args.overrides)
    banks = [b for b in exp.banks if b.imported is not None and (args.bank is None or b.name == args.bank)]
    if not banks:
        raise ValueError(f"{args.experiment}: no bank with imported: files{' named ' + args.bank if args.bank else ''}; "
                         "declare banks: [{name: ..., imported: {values: [...], index: ...}, clips: [...]}]")
    store = Store(args.store or exp.store, lease_ttl=exp.runner.lease_ttl)  # import holds leases (flows.bank_import)
    for b in banks:
        try:
            attrs = IMPORT_BANK(exp, b, store)
        except (StoreWriteError, LeaseError) as e:  # a full disk, a quota, a read-only store: exit 4 (flows.cli)
            raise StoreWriteError(f"the store {store.location} cannot be written ({e}); the import of bank {b.name} "
                                  "stopped, the value stores already imported are kept: free space (`ovseg cache "
                                  "gc`) or fix the store, then rerun the same command") from e
        print(f"bank {b.name}: {attrs['regions']} regions, index {attrs['kind']}/{attrs['metric']}, "
              f"files {', '.join(f['file'] for f in attrs['imported'])} (sha256 recorded)")
    print(f"store: {store.location}")
    return 0


def cmd_bank_ls(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    rows = bank_rows(store)
    if not rows:
        print(f"store {store.location} holds no memory bank (declare one under banks: and run it)")
        return 0
    table = []
    for r in rows:
        models = r["models"]
        names = ", ".join(f"{k}={v}" for k, v in models.items() if v)
        table.append((r["bank"], r["key"], r["images"], r["regions"], human(r["bytes"]),
                      f"{r['kind']}/{r['metric']}" + (f" nlist {r['nlist']}" if r["nlist"] else ""), names,
                      "yes" if r["random_weights"] else "no", canonical_json(r["settings"])))
    print_table(table, ["bank", "key", "images", "regions", "bytes", "index", "models", "random weights",
                        "index settings"])
    if any(r["random_weights"] for r in rows):
        print("NOTE: banks built with random-weight backbones retrieve meaningless neighbours (machinery checks only).")
    print(f"store: {store.location}")
    return 0
