"""Bank build benchmark (``python bench/bank_build.py``): a memory-bank build's wall vs its stages' compute.

Issue 22's target "bank build wall / the bank stages' own compute (tiny models, 1k images) <= 1.05".
The experiment holds one bank (``banks:``) and nothing else, over ``--images`` synthetic 160x120
images (``scale.make_images``), with the tiny random models of ``tests/flows/test_banks.py``
(``clip:tiny``, ``dino:tiny8``, ``vfm:tiny_radiov3``), SLIC regions, 112-pixel windows and an
``--index`` of kind ``ivfpq`` (small PQ, as the test's IVF-PQ bank) or ``flat``. One cold build
through ``run_experiment`` (Prefect unless ``--no-prefect``), then a no-op rerun, then (unless
``--no-bare``) the bare build (``bank_bare.bare_build``: the same loaders and computes, in the
bank's batches, and the index build in a plain loop, no store, no Prefect, no leases); with
``--bare-first`` the bare build runs before the cold build instead (the process is then warm for
the pipeline, not for the bare loop); with ``--bare-around`` it runs both before and after, and
the ratios are against the mean of the two (the shared machine's speed drifts by several percent
between builds a minute apart; the mean cancels a linear drift). Before anything is timed, an untimed bare build of
``--warmup`` other images (default 8) makes the process warm for both builds: imports, model
construction and first calls (SLIC's first call alone, ~0.3 s, had counted against whichever
build ran first); ``--warmup 0`` gives the earlier set-up. Two ratios:

- **wall / bare** (the target's figure, docs/banks.md): cold-run wall / the bare build's wall, and
  the same with process CPU time (Prefect's server process not counted);
- wall / compute (the earlier figure): cold-run wall / the sum over stages of ``StageRun.seconds``,
  which times ``Stage.compute`` only, so the loaders' decode and preprocessing count as overhead;
  the stages a bank does not store (its intermediates, computed in memory inside their readers:
  ``tasks.chain``) count with the seconds the run summary reports for them (``RunSummary.in_memory``;
  a row each, marked "in memory").

Per stage: wall (the stage's interval) and compute (``StageRun.seconds``), and the bare loop's
load + compute seconds. Writes ``<out>/bank-build.json`` and prints the same as a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from scale import WINDOW, make_images, stage_files, timed  # noqa: E402

MODELS = {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "vfm": "vfm:tiny_radiov3@random:0"}
INDEX = {"ivfpq": {"kind": "ivfpq", "pq_m": 8, "pq_nbits": 4, "nlist_factor": 1.0}, "flat": {"kind": "flat"}}
log = logging.getLogger("ovseg.bench.bank_build")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="synthetic bank images (default 1000)")
    p.add_argument("--index", choices=sorted(INDEX), default="ivfpq", help="bank index kind (default ivfpq)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="the bank's banks[].batch_size (images per task and per pack; default: the bank's default)")
    p.add_argument("--io-threads", choices=["auto", "on", "off"], default=None,
                   help="runner.io_threads (loader and writer threads beside the compute; default: the runner's, auto)")
    p.add_argument("--no-prefect", action="store_true", help="run in local threads without Prefect")
    p.add_argument("--no-bare", action="store_true", help="skip the bare build (only wall / compute is printed)")
    p.add_argument("--bare-first", action="store_true",
                   help="run the bare build before the cold build (default after it, when the process is warm)")
    p.add_argument("--bare-around", action="store_true",
                   help="run the bare build both before and after the cold build; the ratio is against the mean of the "
                        "two (the machine's speed drifting between builds a minute apart cancels to first order)")
    p.add_argument("--keep-intermediates", action="store_true",
                   help="store the bank's intermediates too (banks[].persist true for each; the default stores "
                        "only regions, values, keys and index, docs/banks.md section 6)")
    p.add_argument("--warmup", type=int, default=8,
                   help="images of an untimed bare build before anything is timed (other images, seed 1), so that "
                        "neither timed build pays the process's first calls (imports, model construction, first "
                        "kernels); 0: none, the earlier set-up (default 8)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"))
    p.add_argument("--workdir", default=None, help="parent of the temporary images and store (deleted at the end)")
    args = p.parse_args(argv)
    if args.bare_first and args.bare_around:
        p.error("--bare-first and --bare-around exclude each other")
    if args.images < 1 or (args.batch_size is not None and args.batch_size < 1) or args.warmup < 0:
        p.error("--images and --batch-size must be >= 1, --warmup >= 0")
    return args


KEEP = dict.fromkeys(("dino_features", "clip_layers", "vfm_features", "mask_clustering", "mask_class_tokens"), True)


def experiment(store: Path, img_dir: Path, index: str, batch_size: int | None, io_threads: str | None = None,
               keep: bool = False):
    from flows.config import parse_experiment

    bank = {"name": "synth", "root": str(img_dir), "window": WINDOW, "index": INDEX[index],
            **({"persist": KEEP} if keep else {})}
    return parse_experiment({
        "name": "bankbuild", "store": str(store), "models": MODELS,
        "regions": {"source": "slic", "params": {"n_segments": 40}},
        "banks": [bank if batch_size is None else {**bank, "batch_size": batch_size}],
        "runner": {"kind": "local", "workers": 1, **({} if io_threads is None else {"io_threads": io_threads})},
        "text_templates": "single", "feature_dtype": "float32",
    }, source="bench/bank_build.py")


def bare_bank(exp, nowhere: Path) -> dict[str, Any]:
    """``bank_bare.bare_build`` of the experiment's bank in its batches (its rows, ids and paths, made untimed)."""
    from bank_bare import bank_rows, bare_build

    from flows.bank_graph import bank_batch_size

    rows = bank_rows(exp)
    return bare_build(exp, rows, bank_batch_size(exp, exp.banks[0]), nowhere)


def warm_up(n: int, work: Path, index: str, batch_size: int | None) -> float:
    """An untimed bare build of ``n`` other images (seed 1): imports, models and first calls, for both timed builds."""
    img_dir, _ = make_images(work / "warmup-data", n, seed=1)
    t0 = time.perf_counter()
    bare_bank(experiment(work / "warmup-store", img_dir, index, batch_size), work / "warmup-no-store")
    return time.perf_counter() - t0


def build(n: int, work: Path, index: str, batch_size: int | None, orchestrate: bool, bare: bool,
          io_threads: str | None = None, bare_first: bool = False, warmup: int = 0, keep: bool = False,
          bare_around: bool = False) -> dict[str, Any]:
    from flows.pipeline import run_experiment

    log.info("%d images: generating", n)
    img_dir, _ = make_images(work / "data", n)
    store = work / "store"
    exp = experiment(store, img_dir, index, batch_size, io_threads, keep)

    def run_bare() -> dict[str, Any]:
        """The bare build in this thread, where the pipeline computes too (one local worker: the caller's thread,
        with or without Prefect): one GNU OpenMP pool (docs/design.md, "OpenMP on a shared machine")."""
        log.info("%d images: bare build (threads alive: %s; OS threads: %d)", n,
                 ", ".join(t.name for t in threading.enumerate()), len(os.listdir("/proc/self/task")))
        return bare_bank(exp, work / "no-store")

    warm_s = warm_up(warmup, work, index, batch_size) if warmup else 0.0
    if warmup:
        log.info("%d images: warm-up bare build of %d other images took %.1f s (untimed)", n, warmup, warm_s)
    b = run_bare() if bare and (bare_first or bare_around) else None
    log.info("%d images: cold build", n)
    c0 = time.process_time()
    summary, cold_s = timed(lambda: run_experiment(exp, progress=False, orchestrate=orchestrate))
    cold_cpu = time.process_time() - c0
    if summary.status != "complete":
        raise RuntimeError(f"the cold build ended {summary.status}: {[f for s in summary.stages for f in s.failures][:3]}")
    stages = []
    for s in summary.stages:
        if s.stage == "ingest":
            continue
        files, nbytes = stage_files(store, s.stage, s.key)
        stages.append({"stage": s.stage, "key": s.key, "items": s.done, "wall_seconds": s.ended - s.started,
                       "compute_seconds": s.seconds, "files": files, "bytes": nbytes})
    log.info("%d images: no-op rerun", n)
    again, noop_s = timed(lambda: run_experiment(exp, progress=False, orchestrate=orchestrate))
    if again.computed or again.status != "complete":
        raise RuntimeError(f"the no-op rerun computed {again.computed} outputs ({again.status})")
    in_memory = [{"stage": s.stage, "key": s.key, "items": s.done, "compute_seconds": s.seconds}
                 for s in summary.in_memory]
    compute = sum(s["compute_seconds"] for s in stages) + sum(s["compute_seconds"] for s in in_memory)
    out = {"images": n, "index": index, "prefect": orchestrate, "batch_size": batch_size, "warmup_images": warmup,
           "warmup_seconds": warm_s, "keep_intermediates": keep,
           "io_threads": exp.runner.io_threads, "cold_seconds": cold_s,
           "cold_cpu_seconds": cold_cpu, "compute_seconds": compute, "wall_over_compute": cold_s / compute,
           "stage_wall_seconds": sum(s["wall_seconds"] for s in stages), "noop_rerun_seconds": noop_s,
           "stages": stages, "in_memory": in_memory}
    if bare:
        if bare_around:
            before, after = b, run_bare()
            b = {**after, "wall_seconds": (before["wall_seconds"] + after["wall_seconds"]) / 2,
                 "cpu_seconds": (before["cpu_seconds"] + after["cpu_seconds"]) / 2,
                 "before": {k: before[k] for k in ("wall_seconds", "cpu_seconds")},
                 "after": {k: after[k] for k in ("wall_seconds", "cpu_seconds")}}
        b = b or run_bare()
        out.update(bare=b, bare_first=bare_first, bare_around=bare_around, wall_over_bare=cold_s / b["wall_seconds"],
                   cpu_over_bare=cold_cpu / b["cpu_seconds"])
    return out


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Command: `{r['command']}`  ", f"Load average (1, 5, 15 min) at start {r['load_start']}, at end {r['load_end']}",
             "", f"Bank build, {r['images']} images, index {r['index']}, Prefect {'on' if r['prefect'] else 'off'}, "
             f"io_threads {r['io_threads']}, warm-up {r.get('warmup_images', 0)} images, intermediates "
             f"{'stored' if r.get('keep_intermediates') else 'in memory'}: "
             f"cold-run wall {r['cold_seconds']:.1f} s, bank stages' compute {r['compute_seconds']:.1f} s, "
             f"wall / compute {r['wall_over_compute']:.3f}; no-op rerun {r['noop_rerun_seconds']:.1f} s", ""]
    if "bare" in r:
        b = r["bare"]
        when = ("the mean of one before and one after the cold build (before: wall {:.1f} s, after: {:.1f} s)".format(
            b["before"]["wall_seconds"], b["after"]["wall_seconds"]) if r.get("bare_around")
            else f"{'before' if r.get('bare_first') else 'after'} the cold build")
        lines[-1:] = [f"Bare build ({when}; same loaders, "
                      f"computes, batches and index build in a plain loop; no store, Prefect, leases): wall {b['wall_seconds']:.1f} s, CPU {b['cpu_seconds']:.1f} s. **Cold-run wall / bare "
                      f"wall {r['wall_over_bare']:.3f}**; CPU / bare CPU {r['cpu_over_bare']:.3f} (cold-run CPU "
                      f"{r['cold_cpu_seconds']:.1f} s, this process only)", ""]
    bare = {(s["stage"], s["key"]): s for s in r.get("bare", {}).get("stages", [])}
    lines += ["| stage | key | items | wall s | compute s | wall / compute | bare wall s | files | KiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in r["stages"]:
        ratio = s["wall_seconds"] / s["compute_seconds"] if s["compute_seconds"] > 0 else float("nan")
        bw = bare.get((s["stage"], s["key"]), {}).get("wall_seconds", float("nan"))
        lines.append(f"| {s['stage']} | `{s['key'][:6]}` | {s['items']} | {s['wall_seconds']:.2f} | "
                     f"{s['compute_seconds']:.2f} | {ratio:.3f} | {bw:.2f} | {s['files']} | {s['bytes'] / 1024:.0f} |")
    stored = {(s["stage"], s["key"]) for s in r["stages"]}
    memory = {(s["stage"], s["key"]): s for s in r.get("in_memory", [])}  # the run summary's in-memory reports
    for stage, key in dict.fromkeys([*memory, *bare]):  # a bank's intermediates: inside their readers' wall
        if (stage, key) in stored:
            continue
        m, bw = memory.get((stage, key)), bare.get((stage, key), {}).get("wall_seconds", float("nan"))
        items, compute = (m["items"], f"{m['compute_seconds']:.2f}") if m else ("-", "-")
        lines.append(f"| {stage} (in memory, not stored) | `{key[:6]}` | {items} | - | {compute} | - | {bw:.2f} "
                     "| - | - |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="ovseg-bankbuild-", dir=args.workdir))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        if not args.no_prefect:
            from flows.cli import configure_prefect
            from run import prefect_startup_seconds

            configure_prefect()
            prefect_startup_seconds()  # the server start-up, before anything is timed
        result = build(args.images, work, args.index, args.batch_size, not args.no_prefect, not args.no_bare,
                       args.io_threads, args.bare_first, args.warmup, args.keep_intermediates, args.bare_around)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(command=" ".join(["python", "bench/bank_build.py", *(sys.argv[1:] if argv is None else argv)]),
                  load_start=load_start, load_end=[round(x, 2) for x in os.getloadavg()],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bank-build.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
