"""The ``ovseg`` command line.

Commands: ``run``, ``stage``, ``ingest``, ``cache ls``, ``cache gc``, ``runs``, ``report``,
``segment``, ``backbones``, ``demo``. Errors name the bad input and the fix and exit with 2
(usage / input errors) or 1 (failed images).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

log = logging.getLogger("ovseg")

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


class _QuietLibraryNoise(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning: ovseg builds every CLIP without
    pretrained weights and then loads the checkpoint itself (or deliberately keeps random weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


def configure_prefect() -> None:
    """Offline-friendly Prefect settings unless the user set them (called by the CLI, not on import)."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    cols = [list(map(str, c)) for c in zip(header, *rows)] if rows else [[h] for h in header]
    widths = [max(len(x) for x in c) for c in cols]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


# ----------------------------------------------------------------------------- commands
def cmd_ingest(args: argparse.Namespace) -> int:
    from ovseg_core.datasets import class_lines, get_dataset
    from storage.ingest import ingest
    from storage.store import Store
    from storage.tables import write_table

    rows = ingest(args.root, args.layout, dataset=args.dataset, split=args.split, gt_dir=args.gt_dir, progress=not args.quiet)
    name = args.name or (rows[0].dataset if rows else args.layout)
    dicts = [{**r.__dict__, "dataset": name} for r in rows]
    store = Store(args.store)
    path = write_table(store, "manifests", name, dicts)
    ok = [r for r in rows if r.status == "ok"]
    bad = [r for r in rows if r.status != "ok"]
    with_gt = sum(1 for r in ok if r.gt_path)
    print(f"{len(rows)} images ({len(ok)} ok, {len(bad)} unreadable), {with_gt} with ground truth -> {path}")
    if args.list:
        _print_table([(r.image_id, r.rel_path, r.gt_path or "-", f"{r.width}x{r.height}") for r in ok],
                     ["image_id", "image", "ground truth", "size"])
    for r in bad:
        print(f"  skipped {r.rel_path}: {r.error}")
    spec_name = rows[0].dataset if rows else None
    if spec_name:
        try:
            spec = get_dataset(spec_name)
            variant = args.classes or "corrclip"
            lines = class_lines(spec.name, variant)
            print(f"dataset {spec.name}: {spec.num_classes} classes ({variant} class file), background={spec.has_background}, "
                  f"label conversion={spec.label_conversion}")
            print("  classes: " + " | ".join(lines))
        except ValueError:
            pass
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from storage.keys import canonical_json
    from storage.maintenance import list_stages
    from storage.store import Store
    from tasks.stages import STAGE_ORDER

    store = Store(args.store, create=False)
    infos = sorted(list_stages(store, with_bytes=True),
                   key=lambda i: (STAGE_ORDER.index(i.stage) if i.stage in STAGE_ORDER else 99, i.key))
    if not infos:
        print(f"store {store.location} is empty")
        return 0
    rows = []
    for i in infos:
        params = i.attrs.get("stage_key", {}).get("params", {})
        rows.append((i.stage, i.key, i.complete, i.dropped, _human(i.nbytes), "yes" if i.random_weights else "no",
                     canonical_json(params) if "damaged" not in i.attrs else "(stage.json damaged)"))
    _print_table(rows, ["stage", "key", "complete", "un-marked", "bytes", "random weights", "parameters"])
    for i in infos:
        for path in i.damaged_files:
            print(f"  damaged: {path} (ovseg cache verify --repair)")
    print(f"store: {store.location}")
    return 0


def _plan_keys(exp_paths: Sequence[str]) -> set[tuple[str, str]]:
    from flows.config import load_experiment
    from flows.graph import build_plan

    keys: set[tuple[str, str]] = set()
    for exp_path in exp_paths:
        for plan in build_plan(load_experiment(exp_path)):
            keys.update(plan.nodes)
    return keys


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from storage.journal import KeepSet, newest_per_experiment
    from storage.maintenance import gc
    from storage.store import Store

    store = Store(args.store, create=False)
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
    keep.add(_plan_keys(args.experiments), "experiment files")
    if not args.only_experiments:
        chosen = runs if args.all_runs else list(newest_per_experiment(runs).values())
        for r in chosen:
            keep.add(r.plan_keys(), f"run {r.run_id} ({r.experiment})")
    rep = gc(store, keep.keys, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for stage, key, items, nbytes in rep.sets:
        print(f"{verb} {stage}/{key}: {items} items, {_human(nbytes)}")
    print(f"{verb} {len(rep.sets)} output sets ({rep.items} items), {rep.packs} superseded or unrecorded packs, "
          f"{rep.temporaries} temporary files of dead writers, {rep.leases} dead leases: {_human(rep.nbytes)}; "
          f"kept {len(keep.keys)} referenced output sets")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from storage.maintenance import verify
    from storage.store import Store

    store = Store(args.store, create=False)
    sets = store.stage_sets()
    if args.experiment:
        wanted = _plan_keys([args.experiment])
        sets = [s for s in sets if s in wanted]
    if args.stage:
        from tasks.stages import get_stage

        get_stage(args.stage)
        sets = [s for s in sets if s[0] == args.stage]
    reports = verify(store, sets, checksums=not args.sizes_only, repair=args.repair)
    rows = [(r.stage, r.key, r.checked, len(r.damaged), len(r.damaged_files), r.repaired if args.repair else "-")
            for r in reports]
    _print_table(rows, ["stage", "key", "items checked", "damaged items", "damaged files", "repaired"])
    bad = [r for r in reports if not r.ok]
    for r in bad:
        for item, why in r.damaged:
            print(f"  {r.stage}/{r.key}/{item}: {why}")
        for path, why in r.damaged_files:
            print(f"  {path}: {why}")
    if bad and args.repair:
        print("damaged items were un-marked: the next `ovseg run` recomputes exactly those")
    elif bad:
        print("run `ovseg cache verify --repair` to un-mark them (the next run recomputes exactly those)")
    return 1 if bad else 0


def _load_exp(args: argparse.Namespace):
    from flows.config import load_experiment

    exp = load_experiment(args.experiment)
    if getattr(args, "store", None):
        exp = exp.model_copy(update={"store": args.store})
    return exp


def _print_summary(summary) -> None:
    rows = [(s.dataset, s.stage, s.key, s.total, s.done, s.cached, s.skipped + s.busy, s.failed, f"{s.seconds:.1f}")
            for s in summary.stages]
    _print_table(rows, ["dataset", "stage", "key", "images", "computed", "cached", "not done", "failed", "seconds"])


def cmd_run(args: argparse.Namespace, only: Sequence[str] | None = None) -> int:
    from flows.pipeline import run_experiment

    exp = _load_exp(args)
    summary = run_experiment(exp, force=args.force, dry_run=args.dry_run, progress=not args.quiet, only_stages=only,
                             wait=not args.no_wait, experiment_file=str(args.experiment))
    if summary.plan_only:
        print(f"plan for experiment {exp.name} (store {summary.store}):")
        rows = [(s.dataset, s.stage, s.key, s.done, s.cached, s.methods) for s in summary.stages]
        _print_table(rows, ["dataset", "stage", "key", "to compute", "cached", "used by"])
        return 0
    _print_summary(summary)
    if summary.metrics:
        print()
        rows = [(m["dataset"], m["method"], f"{100 * m['miou']:.2f}" if m["miou"] is not None else "nan",
                 f"{100 * m['aacc']:.2f}" if m["aacc"] is not None else "nan",
                 f"{m['images']}/{m['images_total']}" + ("" if m["complete"] else " (partial)"))
                for m in summary.metrics if m["class_index"] == -1]
        _print_table(rows, ["dataset", "method", "mIoU", "aAcc", "images scored"])
    for note in summary.notes:
        print(f"note: {note}")
    if summary.random_weights:
        print("\nNOTE: random-weight backbones were used: scores are at chance level and are NOT method results.")
    failures = [(s.stage, f[0], f[1], f[2]) for s in summary.stages for f in s.failures]
    print(f"\nrun {summary.run_id}: {summary.status}: {summary.computed} outputs computed, {summary.failed} failed, "
          f"{summary.incomplete} left for a later run")
    for stage, iid, etype, err in failures[:20]:
        print(f"  {stage} {iid}: {etype}: {err}")
    if len(failures) > 20:
        print(f"  ... {len(failures) - 20} more (see `ovseg runs --failures {summary.run_id}`)")
    return summary.exit_code


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.stages import get_stage

    get_stage(args.name)
    return cmd_run(args, only=[args.name])


def cmd_runs(args: argparse.Namespace) -> int:
    import time as _time

    from storage.store import Store
    from storage.tables import read_table

    store = Store(args.store, create=False)
    if args.failures:
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
        end = d.get("ended") or (d.get("heartbeat") if r.status == "dead" else _time.time())
        counts = d.get("counts") or {}
        started = _time.strftime("%Y-%m-%d %H:%M:%S", _time.gmtime(r.started))
        rows.append((r.run_id, r.experiment, r.status, started, f"{float(end) - r.started:.0f}s",
                     counts.get("computed", "-"), counts.get("failed", "-"), counts.get("incomplete", "-"),
                     "yes" if d.get("random_weights") else "no"))
    _print_table(rows, ["run", "experiment", "status", "started (UTC)", "wall", "computed", "failed", "left",
                        "random weights"])
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from ovseg_core.backbones import list_backbones, official_weight_file

    for name in list_backbones():
        try:
            fname, where = official_weight_file(name)
        except (ValueError, KeyError):
            fname, where = "-", "random / tiny only"
        print(f"{name:45s} {fname:40s} {where}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.report import write_report

    path = write_report(args.store, args.out, experiments=args.experiment or None, samples=args.samples)
    print(f"report written to {path}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from flows.segment import segment_image

    res = segment_image(args.image, args.classes, method=args.method, out=args.out, store=args.store,
                        clip=args.clip, dino=args.dino, sam=args.sam, regions=args.regions)
    print(f"label map: {res['labels']}\noverlay:   {res['overlay']}")
    if res.get("random_weights"):
        print("NOTE: random-weight backbones were used: the segmentation is meaningless.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    return run_demo(store=args.store, out=args.out)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from ovseg_core.methods import METHODS
    p = argparse.ArgumentParser(prog="ovseg", description="Training-free open-vocabulary semantic segmentation pipeline "
                                "(CorrCLIP, SC-CLIP) over a Zarr stage store.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def store_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", default=None, help="store path or fsspec URL (default $OVSEG_STORE or ./ovseg-store)")

    sp = sub.add_parser("run", help="run an experiment file (only what is missing is computed)")
    sp.add_argument("experiment", help="experiment YAML (see configs/)")
    store_arg(sp)
    sp.add_argument("--dry-run", action="store_true", help="print the plan (stage, key, images to compute / cached) and exit")
    sp.add_argument("--force", action="append", default=[], metavar="STAGE", help="recompute STAGE and its dependants (repeatable)")
    sp.add_argument("--no-wait", action="store_true", help="do not wait for items another live run is computing "
                    "(they are reported and the run exits 3)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("stage", help="run one stage of an experiment (its inputs must be complete)")
    sp.add_argument("name", help="stage name")
    sp.add_argument("experiment")
    store_arg(sp)
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--force", action="append", default=[], metavar="STAGE")
    sp.add_argument("--no-wait", action="store_true")
    sp.add_argument("-q", "--quiet", action="store_true")
    sp.set_defaults(func=cmd_stage)

    sp = sub.add_parser("ingest", help="build the image manifest of a dataset folder")
    sp.add_argument("root", help="dataset root")
    sp.add_argument("--layout", required=True, choices=["folder", "voc", "pascal_context", "coco_object", "coco_stuff",
                                                         "ade20k", "cityscapes", "camvid"])
    sp.add_argument("--dataset", default=None, help="dataset spec (VOC21, VOC20, PC60, PC59, COCO-Object, COCO-Stuff, ADE20K, Cityscapes, CamVid)")
    sp.add_argument("--name", default=None, help="manifest name (default: the dataset spec)")
    sp.add_argument("--split", default="val")
    sp.add_argument("--gt-dir", default=None, help="ground-truth folder for the folder layout")
    sp.add_argument("--classes", default=None, choices=["corrclip", "scclip"], help="class-file variant to show")
    sp.add_argument("--list", action="store_true", help="list image / ground-truth pairs")
    sp.add_argument("-q", "--quiet", action="store_true")
    store_arg(sp)
    sp.set_defaults(func=cmd_ingest)

    cache = sub.add_parser("cache", help="inspect or clean the store")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    sp = csub.add_parser("ls", help="stage outputs: stage, key, parameters, images complete/incomplete, bytes")
    store_arg(sp)
    sp.set_defaults(func=cmd_cache_ls)
    sp = csub.add_parser("gc", help="delete outputs of keys no longer referenced (by the given experiment files and the "
                                    "newest run of each recorded experiment), and incomplete leftovers")
    sp.add_argument("experiments", nargs="*", help="experiment files whose keys are kept")
    sp.add_argument("--only-experiments", action="store_true",
                    help="keep only the keys of the given experiment files (not those of recorded runs)")
    sp.add_argument("--all-runs", action="store_true",
                    help="keep the keys of every recorded run (default: of the newest run of each experiment)")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--force", action="store_true", help="run even while a run is live (its outputs are kept)")
    store_arg(sp)
    sp.set_defaults(func=cmd_cache_gc)
    sp = csub.add_parser("verify", help="check every complete item (presence, sizes, checksums); exit 1 on damage")
    sp.add_argument("experiment", nargs="?", default=None, help="only the stage outputs of this experiment file")
    sp.add_argument("--stage", default=None, help="only this stage")
    sp.add_argument("--repair", action="store_true", help="un-mark damaged items so the next run recomputes exactly those")
    sp.add_argument("--sizes-only", action="store_true", help="check presence and sizes, not checksums (fast)")
    store_arg(sp)
    sp.set_defaults(func=cmd_cache_verify)

    sp = sub.add_parser("runs", help="list run records")
    sp.add_argument("--failures", metavar="RUN_ID", default=None, help="list the failed images of one run")
    store_arg(sp)
    sp.set_defaults(func=cmd_runs)

    sp = sub.add_parser("report", help="write a self-contained HTML report of the experiments in the store")
    store_arg(sp)
    sp.add_argument("--out", default="ovseg-report", help="output folder (index.html + PNGs)")
    sp.add_argument("--experiment", action="append", default=[], help="restrict to these experiments (repeatable)")
    sp.add_argument("--samples", type=int, default=4, help="images per dataset shown as overlays")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("segment", help="segment one image with a custom vocabulary")
    sp.add_argument("image")
    sp.add_argument("--classes", required=True, help='classes separated by ";", synonyms by ",": "cat; dog, puppy; grass"')
    sp.add_argument("--method", default="corrclip", choices=list(METHODS))
    sp.add_argument("--out", default="overlay.png", help="overlay PNG (the label map is written next to it)")
    sp.add_argument("--clip", default=None, help="CLIP backbone name (default: the method's paper backbone)")
    sp.add_argument("--dino", default=None)
    sp.add_argument("--sam", default=None)
    sp.add_argument("--regions", default="sam", choices=["sam", "slic", "felzenszwalb"])
    store_arg(sp)
    sp.set_defaults(func=cmd_segment)

    sp = sub.add_parser("backbones", help="list backbone names and their official weight files")
    sp.set_defaults(func=cmd_backbones)

    sp = sub.add_parser("demo", help="the full pipeline on the embedded sample with RANDOM weights (scores meaningless)")
    store_arg(sp)
    sp.add_argument("--out", default="demo-out", help="folder for the report")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    configure_prefect()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraryNoise())
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
