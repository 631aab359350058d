"""``ovseg ingest``, ``backbones``, ``report``, ``segment`` and ``demo``.

None of them starts a Prefect server: ``segment`` runs its one image without Prefect unless a
Prefect API is configured (then it is a flow run like any other); ``demo`` is a flow run
unless ``--no-prefect``.
"""

from __future__ import annotations

import argparse

from flows.commands.common import read_only_store
from flows.emptiness import empty_dataset_error
from flows.report import write_report
from flows.summary import print_table
from ovseg_core.datasets import class_lines, get_dataset
from ovseg_core.names import did_you_mean
from storage.ingest import ingest
from storage.store import Store
from storage.tables import read_table, write_table


def cmd_ingest(args: argparse.Namespace) -> int:
    rows = ingest(args.root, args.layout, dataset=args.dataset, split=args.split, gt_dir=args.gt_dir,
                  progress=args.verbosity >= 0)
    if not rows:
        raise empty_dataset_error(args.name or args.dataset or args.layout, args.root, args.layout)
    name = args.name or rows[0].dataset
    dicts = [{**r.__dict__, "dataset": name} for r in rows]
    path = write_table(Store(args.store), "manifests", name, dicts)
    ok = [r for r in rows if r.status == "ok"]
    bad = [r for r in rows if r.status != "ok"]
    with_gt = sum(1 for r in ok if r.gt_path)
    print(f"{len(rows)} images ({len(ok)} ok, {len(bad)} unreadable), {with_gt} with ground truth -> {path}")
    if args.list:
        print_table([(r.image_id, r.rel_path, r.gt_path or "-", f"{r.width}x{r.height}") for r in ok],
                    ["image_id", "image", "ground truth", "size"])
    for r in bad:
        print(f"  skipped {r.rel_path}: {r.error}")
    try:
        spec = get_dataset(rows[0].dataset)
    except ValueError:  # a folder of images without a benchmark spec
        return 0
    variant = args.classes or "corrclip"
    lines = class_lines(spec.name, variant)
    print(f"dataset {spec.name}: {spec.num_classes} classes ({variant} class file), background={spec.has_background}, "
          f"label conversion={spec.label_conversion}")
    print("  classes: " + " | ".join(lines))
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from ovseg_core.backbones import VFM_ARCHS, list_backbones, official_weight_file, parse_backbone  # torch, open_clip

    for name in list_backbones():
        try:
            fname, where = official_weight_file(name)
        except (ValueError, KeyError):
            fname, where = "-", "random / tiny only"
        spec = parse_backbone(name)
        page = VFM_ARCHS[spec.arch].page if spec.family == "vfm" and spec.arch in VFM_ARCHS else None
        print(f"{name:45s} {fname:40s} {where}" + (f"  (page: {page})" if page else ""))
    return 0


def stored_experiments(store) -> list[str]:
    """Names of the experiments with scores in the store (the metrics table), sorted."""
    if not store.table_names("metrics"):
        return []
    return sorted(set(read_table(store, "metrics").column("experiment").to_pylist()))


def cmd_report(args: argparse.Namespace) -> int:
    store = read_only_store(args.store)
    if args.experiment:
        have = stored_experiments(store)
        missing = [e for e in args.experiment if e not in have]
        if missing:
            hints = [f"{e!r}{did_you_mean(e, have)}" for e in missing]
            raise ValueError(f"no scores of experiment {', '.join(hints)} in {store.location}; experiments with "
                             f"scores: {', '.join(have) if have else 'none yet (run `ovseg run EXP.yaml`)'}")
    path = write_report(store.location, args.out, experiments=args.experiment or None, samples=args.samples)
    print(f"report written to {path}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from flows.segment import segment_image  # torch (the stage graph and the models)

    res = segment_image(args.image, args.classes, method=args.method, out=args.out, store=args.store,
                        clip=args.clip, dino=args.dino, sam=args.sam, regions=args.regions,
                        progress=args.verbosity >= 0, weights_dir=args.weights_dir)
    print(f"label map: {res['labels']}\noverlay:   {res['overlay']}")
    print(f"done in {res['seconds']:.1f} s ({res['stage_seconds']:.1f} s loading models and computing)")
    if res.get("random_weights"):
        print("NOTE: random-weight backbones were used: the segmentation is meaningless.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo  # torch, Prefect

    return run_demo(store=args.store, out=args.out, progress=args.verbosity >= 0, orchestrate=not args.no_prefect)
