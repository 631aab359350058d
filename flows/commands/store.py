"""``ovseg cache ls / verify / gc`` and ``ovseg runs``: read (or clean) the store, never start Prefect.

Each opens an existing store only (``Store(create=False)``): a mistyped ``--store`` exits 2
and creates nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence

from flows.commands.common import human, read_only_store
from flows.key_view import shown_params
from flows.summary import print_table, stage_legend
from storage.journal import KeepSet, newest_per_experiment
from storage.keys import canonical_json
from storage.maintenance import SetReport, evict, gc, list_stages, verify
from storage.tables import read_table, verify_tables
from tasks.stages import STAGE_ORDER, get_stage


def cmd_cache_ls(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    infos = sorted(list_stages(store, with_bytes=True),
                   key=lambda i: (STAGE_ORDER.index(i.stage) if i.stage in STAGE_ORDER else 99, i.key))
    if not infos:
        print(f"store {store.location} is empty")
        return 0
    rows = []
    for i in infos:
        params = i.attrs.get("stage_key", {}).get("params", {})
        rows.append((i.stage, i.key, i.complete, i.dropped, human(i.nbytes), "yes" if i.random_weights else "no",
                     "(stage.json damaged)" if "damaged" in i.attrs else canonical_json(shown_params(i.stage, params))))
    print_table(rows, ["stage", "key", "complete", "un-marked", "bytes", "random weights", "parameters"])
    for i in infos:
        for path in i.damaged_files:
            print(f"  damaged: {path} (ovseg cache verify --repair)")
    print("what each stage computes:\n" + "\n".join(stage_legend(i.stage for i in infos)))
    print(f"store: {store.location}")
    return 0


def plan_keys(exp_paths: Sequence[str], overrides: Sequence[str] = ()) -> set[tuple[str, str]]:
    """Every ``(stage, key)`` of the given experiment files (the stage graph is imported only when there are some)."""
    if not exp_paths:
        return set()
    from flows.graph import experiment_keys  # torch (backbone geometry): only when experiment files are given

    return experiment_keys(exp_paths, overrides)


_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``500G``, ``20MiB``, ``1.5T``, ``123456`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}; use e.g. 500G, 20M or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}; use e.g. 30d, 12h, 90m or seconds")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def cmd_cache_gc(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    runs, damaged = store.runs()
    for path, err in damaged:
        print(f"warning: unreadable run journal {path} ({err}); its plan is not protected", file=sys.stderr)
    keep = KeepSet()
    keep.live_runs = [r for r in runs if r.live]
    if keep.live_runs and not args.force:
        names = ", ".join(f"{r.run_id} ({r.experiment})" for r in keep.live_runs)
        print(f"error: run(s) {names} are running on this store; wait for them or pass --force "
              "(their outputs are kept either way)", file=sys.stderr)
        return 2
    for r in keep.live_runs:
        keep.add(r.plan_keys(), f"live run {r.run_id}")
    keep.add(plan_keys(args.experiments), "experiment files")
    if not args.only_experiments:  # the budget too keeps these: the newest results of each experiment stay
        chosen = runs if args.all_runs else list(newest_per_experiment(runs).values())
        for r in chosen:
            keep.add(r.plan_keys(), f"run {r.run_id} ({r.experiment})")
    verb = "would remove" if args.dry_run else "removed"
    if args.max_bytes is not None or args.older_than is not None:  # the storage budget: least recently used first
        budget = evict(store, keep.keys, max_bytes=args.max_bytes, older_than=args.older_than, dry_run=args.dry_run)
        for stage, key, items, nbytes in budget.sets:
            print(f"{verb} {stage}/{key}: {_n(items, 'item')}, {human(nbytes)} (least recently used)")
        print(f"{verb} {_n(len(budget.sets), 'output set')} ({_n(budget.items, 'item')}): {human(budget.nbytes)} freed "
              "by the storage budget")
        if args.max_bytes is not None and budget.remaining > args.max_bytes:
            print(f"the kept output sets still total {human(budget.remaining)}, over the budget of "
                  f"{human(args.max_bytes)}: they belong to live runs, the given experiment files or the newest run of "
                  "each experiment; pass --only-experiments to evict the newest runs' outputs too")
        keep.add(set(store.stage_sets()), "kept by the budget")  # then only leftovers of dead writers go
    rep = gc(store, keep.keys, dry_run=args.dry_run)
    for stage, key, items, nbytes in rep.sets:
        print(f"{verb} {stage}/{key}: {_n(items, 'item')}, {human(nbytes)}")
    for stage, key, folder, n, nbytes in rep.segment_folders:
        print(f"{verb} {stage}/{key}/{folder}: {_n(n, 'bank value row segment')} no kept bank index lists, "
              f"{human(nbytes)}")
    leftovers = (f"{_n(rep.packs, 'superseded or unrecorded pack')}, {_n(rep.temporaries, 'temporary file')} of dead "
                 f"writers, {_n(rep.leases, 'dead lease')}, {_n(rep.segments, 'unlisted bank value row segment')}")
    if args.max_bytes is not None or args.older_than is not None:  # the budget line above counted the output sets
        print(f"also {verb} {leftovers}: {human(rep.nbytes)}")
    else:
        print(f"{verb} {_n(len(rep.sets), 'output set')} ({_n(rep.items, 'item')}), {leftovers}: {human(rep.nbytes)}; "
              f"kept {_n(len(keep.keys), 'referenced output set')}")
    return 0


def _n(count: int, noun: str) -> str:
    """``1 item``, ``2 items``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def cmd_cache_verify(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    sets = store.stage_sets()
    if args.experiment:
        wanted = plan_keys([args.experiment])
        sets = [s for s in sets if s in wanted]
    if args.stage:
        get_stage(args.stage)
        sets = [s for s in sets if s[0] == args.stage]
    reports = verify(store, sets, checksums=not args.sizes_only, repair=args.repair)
    if not args.stage and not args.experiment:  # the store's tables: every file must parse as its table
        for table, (files, damaged) in verify_tables(store, repair=args.repair).items():
            reports.append(SetReport("table", table, files, damaged_files=[(e.path, e.problem) for e in damaged],
                                     repaired=len(damaged) if args.repair else 0))
    rows = [(r.stage, r.key, r.checked, len(r.damaged), len(r.damaged_files), r.repaired if args.repair else "-")
            for r in reports]
    print_table(rows, ["stage", "key", "items checked", "damaged items", "damaged files", "repaired"])
    bad = [r for r in reports if not r.ok]
    for r in bad:
        for item, why in r.damaged:
            print(f"  {r.stage}/{r.key}/{item}: {why}")
        for path, why in r.damaged_files:
            print(f"  {path}: {why}")
    if bad and args.repair:
        print("damaged items were un-marked and unreadable files removed: the next `ovseg run` recomputes exactly "
              "those (and rebuilds manifests and metrics)")
    elif bad:
        print("run `ovseg cache verify --repair` to un-mark them (the next run recomputes exactly those)")
    return 1 if bad else 0


def cmd_runs(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    if args.failures:
        known = store.table_names("failures")
        if args.failures not in known:
            runs = sorted(known)[-5:]
            raise ValueError(f"no run {args.failures!r} in {store.location}; recent runs: "
                             f"{', '.join(runs) if runs else 'none'} (`ovseg runs` lists them)")
        t = read_table(store, "failures", [args.failures]).to_pylist()
        for r in t:
            print(f"{r['dataset']}  {r['stage']}  {r['key']}  [{r['methods'] or '-'}]  {r['image_id']}\n"
                  f"    {r['error_type']}: {r['error']}")
        if not t:
            print(f"run {args.failures}: no failures")
        return 0
    runs, damaged = store.runs()
    for path, err in damaged:
        print(f"warning: unreadable run journal {path} ({err})", file=sys.stderr)
    if not runs:
        print(f"no runs recorded in {store.location}")
        return 0
    rows = []
    for r in runs:
        d = r.data
        end = d.get("ended") or (d.get("heartbeat") if r.status == "dead" else time.time())
        counts = d.get("counts") or {}
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started))
        rows.append((r.run_id, r.experiment, r.status, started, f"{float(end) - r.started:.0f}s",
                     counts.get("computed", "-"), counts.get("failed", "-"), counts.get("incomplete", "-"),
                     "yes" if d.get("random_weights") else "no", " ".join(d.get("overrides") or []) or "-"))
    print_table(rows, ["run", "experiment", "status", "started (UTC)", "wall", "computed", "failed", "left",
                       "random weights", "overrides"])
    return 0
