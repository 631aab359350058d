"""``ovseg run``, ``stage``, ``serve`` and ``export``: the commands that take an experiment file.

All four accept ``--set KEY=VALUE`` (repeatable; dotted paths with list indices, values
parsed as YAML, e.g. ``--set methods.0.params.tau=3``), applied after ``extends:`` merging
and recorded in the run journal.
"""

from __future__ import annotations

import argparse

from flows.commands.common import load_exp
from flows.export import export_predictions
from flows.summary import print_plan, print_run
from tasks.stages import get_stage


def cmd_run(args: argparse.Namespace, only: list[str] | None = None) -> int:
    from flows.pipeline import run_experiment  # torch (the stage graph) and, for flow runs, Prefect

    exp = load_exp(args)
    summary = run_experiment(exp, force=args.force, dry_run=args.dry_run, progress=args.verbosity >= 0,
                             only_stages=only, wait=not args.no_wait, experiment_file=str(args.experiment),
                             orchestrate=not args.no_prefect, report_dir=args.report, max_failed=args.max_failed)
    if summary.plan_only:
        print_plan(summary, exp.name)
        return 0
    print_run(summary)
    return summary.exit_code


def cmd_stage(args: argparse.Namespace) -> int:
    get_stage(args.name)  # before the experiment file is read
    return cmd_run(args, only=[args.name])


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve_experiment  # Prefect

    serve_experiment(args.experiment, cron=args.cron, interval=args.interval, overrides=args.overrides,
                     store=args.store, name=args.name, report_dir=args.report, max_failed=args.max_failed,
                     timezone=args.timezone)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
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
