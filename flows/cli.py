"""The ``ovseg`` command line: the parser and ``main``; the commands live in ``flows.commands``.

Commands: ``run``, ``stage``, ``serve``, ``export``, ``ingest``, ``cache ls|verify|gc``, ``bank ls|import``,
``runs``, ``report``, ``segment``, ``backbones``, ``demo``. ``-v`` / ``-q`` work on every
command, before or after its name. Exit codes: 0 done, 1 failed images (or damage found by
``cache verify``), 2 usage or input error (the message names the bad value and the fix),
3 incomplete (items left for a later run, predictions missing for ``export``), 4 the store
cannot be written (disk full, read-only, permissions; completed outputs are kept), 130
interrupted. Only ``run``, ``stage``, ``serve`` and ``demo`` use Prefect (``segment`` only
when a Prefect API is configured); the other commands never import its server.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from flows.commands import bank as B
from flows.commands import run as R
from flows.commands import store as S
from flows.commands import tools as T
from flows.export import FORMATS as EXPORT_FORMATS
from flows.logs import configure_logging, verbosity
from flows.prefect_settings import configure_prefect
from flows.summary import EXIT_STORAGE, stage_legend
from storage.fserrors import StoreWriteError
from storage.layouts import LAYOUT_NAMES, LAYOUTS
from tasks.stages import STAGE_ORDER



def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return v


def _verbosity_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` / ``-q``; on subcommands they default to SUPPRESS so a flag before the command is kept."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true", help="ovseg debug lines (libraries stay at WARNING)",
                        **({"default": False} if top else default))
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars",
                        **({"default": False} if top else default))


def _store(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--store", default=None, help="store path or fsspec URL (default: the experiment file's "
                    "`store:` where the command takes one, else $OVSEG_STORE, else ./ovseg-store)")


def _overrides(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the experiment (repeatable; dotted path with list indices, YAML value: "
                         "--set methods.0.params.tau=3 --set runner.workers=2)")


def _run_options(sp: argparse.ArgumentParser, report: bool = True) -> None:
    sp.add_argument("--max-failed", type=_fraction, default=None, metavar="FRACTION",
                    help="fraction of failed images above which the Prefect flow run is Failed instead of "
                         "Completed/Partial (default 0.1; exit codes do not change)")
    if report:
        sp.add_argument("--report", default=None, metavar="DIR", help="write the HTML report of the experiment to DIR "
                        "at the end of each run (published as a Prefect artifact)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovseg", description="Training-free open-vocabulary semantic segmentation pipeline "
                                "(CorrCLIP, SC-CLIP) over a stage store.")
    _verbosity_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, help: str, func, epilog: str | None = None) -> argparse.ArgumentParser:
        formatter = argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter
        sp = parent.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=formatter)
        _verbosity_options(sp, top=False)
        sp.set_defaults(func=func)
        return sp

    for name, help_text in (("run", "run an experiment file (only what is missing is computed)"),
                            ("stage", "run one stage of an experiment (its inputs must be complete)")):
        sp = command(sub, name, help_text, R.cmd_run if name == "run" else R.cmd_stage,
                     epilog="stages (in dependency order):\n" + "\n".join(stage_legend(STAGE_ORDER)))
        if name == "stage":
            sp.add_argument("name", help="stage name (listed below)")
        sp.add_argument("experiment", help="experiment YAML (see configs/)")
        _store(sp)
        _overrides(sp)
        sp.add_argument("--dry-run", action="store_true", help="print the plan (stage, key, images to compute / "
                        "cached) and exit; writes nothing")
        sp.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="recompute STAGE and its dependants (repeatable)")
        sp.add_argument("--no-wait", action="store_true", help="do not wait for items another live run is computing "
                        "(they are reported and the run exits 3)")
        sp.add_argument("--no-prefect", action="store_true", help="run batches in local threads without Prefect "
                        "(no server start-up; nothing in the Prefect UI)")
        _run_options(sp, report=name == "run")
        if name == "stage":
            sp.set_defaults(report=None)

    sp = command(sub, "serve", "serve the experiment as a Prefect deployment with a schedule: each run re-ingests "
                 "the datasets and computes only new or changed images (blocks; Ctrl-C stops it)", R.cmd_serve)
    sp.add_argument("experiment", help="experiment YAML (read again at every run)")
    when = sp.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", default=None, help='cron schedule, e.g. "0 1 * * *" (01:00 every night)')
    when.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="run every SECONDS")
    sp.add_argument("--name", default=None, help="deployment name (default: the experiment name)")
    sp.add_argument("--timezone", default=None, help="IANA time zone of the schedule, e.g. Europe/Paris (default UTC)")
    _store(sp)
    _overrides(sp)
    _run_options(sp)

    sp = command(sub, "export", "write one PNG per image from the stored predictions (never recomputes)",
                 R.cmd_export)
    sp.add_argument("experiment", help="experiment YAML whose predictions are exported")
    sp.add_argument("--out", required=True, metavar="DIR", help="output folder (DIR/<dataset>/<method>/<image>.png)")
    sp.add_argument("--dataset", action="append", default=[], help="only this dataset (repeatable)")
    sp.add_argument("--method", action="append", default=[], help="only this method entry (repeatable)")
    sp.add_argument("--format", default="labels", choices=EXPORT_FORMATS,
                    help="labels: class ids as mmseg writes them (uint8, uint16 above 255; +1 for reduce_zero_label "
                         "datasets); color: the palette; overlay: palette blended over the image")
    _store(sp)
    _overrides(sp)

    sp = command(sub, "ingest", "build the image manifest of a dataset folder", T.cmd_ingest)
    sp.add_argument("root", help="dataset root")
    sp.add_argument("--layout", required=True, choices=LAYOUT_NAMES,
                    help="; ".join(f"{lay.name}: {lay.reads}" for lay in LAYOUTS.values()))
    sp.add_argument("--dataset", default=None, help="dataset spec (VOC21, VOC20, PC60, PC59, COCO-Object, COCO-Stuff, "
                    "ADE20K, Cityscapes, CamVid)")
    sp.add_argument("--name", default=None, help="manifest name (default: the dataset spec)")
    sp.add_argument("--split", default="val")
    sp.add_argument("--gt-dir", default=None, help="ground-truth folder for the folder layout")
    sp.add_argument("--classes", default=None, choices=["corrclip", "scclip"], help="class-file variant to show")
    sp.add_argument("--list", action="store_true", help="list image / ground-truth pairs")
    _store(sp)

    cache = sub.add_parser("cache", help="inspect or clean the store", description="inspect or clean the store")
    _verbosity_options(cache, top=False)
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    sp = command(csub, "ls", "stage outputs: stage, key, parameters, items complete / un-marked, bytes", S.cmd_cache_ls)
    _store(sp)
    sp = command(csub, "gc", "delete outputs of keys no longer referenced (by the given experiment files and the "
                 "newest run of each recorded experiment), and incomplete leftovers", S.cmd_cache_gc)
    sp.add_argument("experiments", nargs="*", help="experiment files whose keys are kept")
    sp.add_argument("--only-experiments", action="store_true",
                    help="keep only the keys of the given experiment files (not those of recorded runs)")
    sp.add_argument("--all-runs", action="store_true",
                    help="keep the keys of every recorded run (default: of the newest run of each experiment)")
    sp.add_argument("--max-bytes", type=S.parse_size, default=None, metavar="SIZE",
                    help="storage budget: evict whole output sets, least recently used first, until the stage outputs "
                         "total at most SIZE (e.g. 500G, 20M, 123456); never those of live runs, of the given "
                         "experiment files and of the newest run of each experiment (every run with --all-runs; "
                         "with --only-experiments only live runs and the given files are kept)")
    sp.add_argument("--older-than", type=S.parse_duration, default=None, metavar="AGE",
                    help="evict output sets no run has used for AGE (e.g. 30d, 12h, 90m, 3600); keeps what "
                         "--max-bytes keeps")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--force", action="store_true", help="run even while a run is live (its outputs are kept)")
    _store(sp)
    sp = command(csub, "verify", "check every complete item (presence, sizes, checksums); exit 1 on damage",
                 S.cmd_cache_verify)
    sp.add_argument("experiment", nargs="?", default=None, help="only the stage outputs of this experiment file")
    sp.add_argument("--stage", default=None, help="only this stage")
    sp.add_argument("--repair", action="store_true", help="un-mark damaged items so the next run recomputes them")
    sp.add_argument("--sizes-only", action="store_true", help="check presence and sizes, not checksums (fast)")
    _store(sp)

    bsub = sub.add_parser("bank", help="memory banks (CorrCLIPv2): list, import").add_subparsers(
        dest="bank_command", required=True, metavar="BANK_COMMAND")
    sp = command(bsub, "ls", "memory banks of the store: regions, images, bytes, models, index settings",
                 B.cmd_bank_ls)
    _store(sp)
    sp = command(bsub, "import", "the authors' prebuilt bank files (.pt stores, .faiss index) of an experiment's "
                 "banks[].imported into the store, streamed and checked", B.cmd_bank_import)
    sp.add_argument("experiment", help="experiment file declaring banks: [{name, imported: {values, index}, clips}]")
    sp.add_argument("--bank", default=None, help="only this bank")
    _overrides(sp)
    _store(sp)

    sp = command(sub, "runs", "list runs (status, wall time, counts, overrides)", S.cmd_runs)
    sp.add_argument("--failures", metavar="RUN_ID", default=None, help="list the failed images of one run")
    _store(sp)

    sp = command(sub, "report", "write a self-contained HTML report of the experiments in the store", T.cmd_report)
    _store(sp)
    sp.add_argument("--out", default="ovseg-report", help="output folder (index.html + PNGs)")
    sp.add_argument("--experiment", action="append", default=[], help="restrict to these experiments (repeatable)")
    sp.add_argument("--samples", type=int, default=4, help="images per dataset shown as overlays")

    sp = command(sub, "segment", "segment one image with a custom vocabulary", T.cmd_segment)
    sp.add_argument("image")
    sp.add_argument("--classes", required=True, help='classes separated by ";", synonyms by ",": "cat; dog, puppy; grass"')
    sp.add_argument("--method", default="corrclip", help="method name (corrclip, scclip, ...; default corrclip)")
    sp.add_argument("--out", default="overlay.png", help="overlay PNG (the label map is written next to it)")
    sp.add_argument("--clip", default=None, help="CLIP backbone name (default: the method's paper backbone)")
    sp.add_argument("--dino", default=None)
    sp.add_argument("--sam", default=None, help="SAM backbone, or the SAM 2 one with --regions sam2 "
                    "(default sam:vit_b / sam2:hiera_l)")
    sp.add_argument("--regions", default="sam", choices=["sam", "sam2", "slic", "felzenszwalb"])
    sp.add_argument("--weights-dir", default=None, metavar="DIR", help="official checkpoints (default $OVSEG_WEIGHTS)")
    _store(sp)

    command(sub, "backbones", "list backbone names and their official weight files", T.cmd_backbones)

    sp = command(sub, "demo", "the full pipeline on the embedded sample with RANDOM weights (scores meaningless)",
                 T.cmd_demo)
    _store(sp)
    sp.add_argument("--out", default="demo-out", help="folder for the report")
    sp.add_argument("--no-prefect", action="store_true", help="run without Prefect (no server start-up)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.verbosity = verbosity(args.verbose, args.quiet)
    except ValueError as e:
        parser.error(str(e))
    configure_logging(args.verbosity)
    configure_prefect()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: completed outputs are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    except StoreWriteError as e:  # disk full, read-only, permissions: not the user's input
        if args.verbosity > 0:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        if args.verbosity > 0:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
