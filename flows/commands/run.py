"""``ovseg run``, ``stage``, ``serve`` and ``export``: the commands that take an experiment file.

All four accept ``--set KEY=VALUE`` (repeatable; dotted paths with list indices, values
parsed as YAML, e.g. ``--set methods.0.params.tau=3``), applied after ``extends:`` merging
and recorded in the run journal.
"""

from __future__ import annotations

import argparse

from flows.commands.common import load_exp
from flows.summary import print_summary, print_table


def cmd_run(args: argparse.Namespace, only: list[str] | None = None) -> int:
    from flows.pipeline import run_experiment

    exp = load_exp(args)
    summary = run_experiment(exp, force=args.force, dry_run=args.dry_run, progress=args.verbosity >= 0,
                             only_stages=only, wait=not args.no_wait, experiment_file=str(args.experiment),
                             orchestrate=not args.no_prefect, report_dir=args.report, max_failed=args.max_failed)
    if summary.plan_only:
        print(f"plan for experiment {exp.name} (store {summary.store}; nothing was written):")
        rows = [(s.dataset, s.stage, s.key, s.done, s.cached, s.methods) for s in summary.stages]
        print_table(rows, ["dataset", "stage", "key", "to compute", "cached", "used by"])
        for note in summary.notes:
            print(f"note: {note}")
        return 0
    print_summary(summary)
    if summary.metrics:
        print()
        rows = [(m["dataset"], m["method"], f"{100 * m['miou']:.2f}" if m["miou"] is not None else "nan",
                 f"{100 * m['aacc']:.2f}" if m["aacc"] is not None else "nan",
                 f"{m['images']}/{m['images_total']}" + ("" if m["complete"] else " (partial)"))
                for m in summary.metrics if m["class_index"] == -1]
        print_table(rows, ["dataset", "method", "mIoU", "aAcc", "images scored"])
    for note in summary.notes:
        print(f"note: {note}")
    if summary.random_weights:
        print("\nNOTE: random-weight backbones were used: scores are at chance level and are NOT method results.")
    failures = [(s.stage, f[0], f[1], f[2]) for s in summary.stages for f in s.failures]
    state = f" (Prefect state {summary.state})" if summary.state else ""
    print(f"\nrun {summary.run_id}: {summary.status}{state}: {summary.computed} outputs computed, {summary.failed} failed, "
          f"{summary.incomplete} left for a later run")
    for stage, iid, etype, err in failures[:20]:
        print(f"  {stage} {iid}: {etype}: {err}")
    if len(failures) > 20:
        print(f"  ... {len(failures) - 20} more (see `ovseg runs --failures {summary.run_id}`)")
    if summary.report:
        print(f"report: {summary.report}")
    return summary.exit_code


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.stages import get_stage

    get_stage(args.name)
    return cmd_run(args, only=[args.name])


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_experiment

    serve_experiment(args.experiment, cron=args.cron, interval=args.interval, overrides=args.overrides,
                     store=args.store, name=args.name, report_dir=args.report, max_failed=args.max_failed,
                     timezone=args.timezone)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flows.export import export_predictions

    exp = load_exp(args)
    result = export_predictions(exp, args.out, datasets=args.dataset or None, methods=args.method or None,
                                fmt=args.format, progress=args.verbosity >= 0)
    print(f"{result.written} PNG(s) written under {result.out} ({args.format})")
    if result.missing:
        print(f"{len(result.missing)} image(s) have no complete prediction in the store (run `ovseg run "
              f"{args.experiment}` first):")
        for dataset, method, image in result.missing[:20]:
            print(f"  {dataset} {method} {image}")
        if len(result.missing) > 20:
            print(f"  ... {len(result.missing) - 20} more")
        return 3
    return 0
