"""Benchmark of the ovseg pipeline (``make bench`` / ``python bench/run.py``).

On the embedded VOC sample (``examples/data``) and the CamVid sample (``../shared/data``), with
random-init backbones of the real architectures (``--tiny``: the tiny test configurations),
each repeat runs, in fresh temporary stores:

1. the CorrCLIP experiment cold (``bench``): per-stage wall time, images/s, bytes stored per
   image, peak RSS attributed to the stage whose wall interval holds the sample;
2. the bare ``ovseg_core`` forwards of the model stages on the same images (``bench/bare.py``):
   overhead ratio = stage wall time in the pipeline / bare time (target <= 1.10);
3. the same experiment with only CorrCLIP ``tau`` changed (4.0 -> 3.0): incremental ratio =
   rerun wall / first run wall (target <= 0.05), and which stages it recomputed;
4. a second experiment (``bench-b``: one more CorrCLIP variant sharing every upstream stage) in
   the warm store and cold in a fresh store: cache-hit ratio = warm / cold wall time.

FLOPs of the model stages are counted once (``FlopCounterMode``, first image) and compared with
this machine's float32 matmul rate. Results are medians over ``--repeats``; every ratio is
computed within one repeat. The Prefect ephemeral server start-up and the model loads happen
once per process, are timed separately and are excluded from the stage timings.
Outputs: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CAMVID = REPO.parent / "shared" / "data" / "camvid-sample"
EMBEDDED_VOC = REPO / "examples" / "data" / "voc2012-sample"
DEFAULT_OUT = REPO / "bench" / "out"
FULL_MODELS = {"clip": "clip:ViT-B-16@random:0", "dino": "dino:{dino}@random:0", "sam": "sam:vit_b@random:0"}
TINY_MODELS = {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0"}
DINO_CHOICES = ("vitb8", "vits8", "vitb16", "vits16")
TAU_FIRST, TAU_RERUN = 4.0, 3.0  # CorrCLIP tau of the first run (paper default) and of the incremental rerun
EXTRA_METHOD = {"name": "corrclip-beta0.25", "method": "corrclip", "params": {"beta": 0.25}}  # shares all upstream
INCREMENTAL_STAGES = ("reconstruction", "map_correction", "scoring")  # all a tau change may recompute
OVERHEAD_TARGET = 1.10
INCREMENTAL_TARGET = 0.05

log = logging.getLogger("ovseg.bench")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4, help="images per dataset (first N by path; default 4)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; results are medians (default 3)")
    p.add_argument("--tiny", action="store_true", help="tiny test configurations of CLIP / DINO / SAM (smoke test)")
    p.add_argument("--dino", choices=DINO_CHOICES, default="vitb8",
                   help="DINO architecture (random init); vitb8 is the paper's, vits16 is far cheaper (default vitb8)")
    p.add_argument("--camvid-root", default=str(DEFAULT_CAMVID), help="CamVid sample root (skipped when absent)")
    p.add_argument("--no-camvid", action="store_true", help="embedded VOC sample only")
    p.add_argument("--cold-text", action="store_true",
                   help="compute the text embeddings in every cold run (default: once per process, seeded into each "
                        "fresh store and reported separately, like the model loads: 80 templates x every class through the "
                        "CLIP text tower is a one-time cost per vocabulary that would dominate small cold runs)")
    p.add_argument("--window-batch", type=int, default=4, help="windows per backbone forward (experiment window_batch)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder for results.json / results.md")
    p.add_argument("--workdir", default=None, help="parent of the temporary stores (default: the system temp dir)")
    args = p.parse_args(argv)
    for name in ("images", "repeats", "window_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def models_for(args: argparse.Namespace) -> dict[str, str]:
    if args.tiny:
        return dict(TINY_MODELS)
    return {k: v.format(dino=args.dino) for k, v in FULL_MODELS.items()}


def dataset_entries(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Experiment dataset entries: the embedded VOC sample, and CamVid when present."""
    out = [{"name": "voc21-sample", "spec": "VOC21", "layout": "voc", "root": str(EMBEDDED_VOC), "limit": args.images}]
    camvid = Path(args.camvid_root)
    if args.no_camvid:
        log.info("CamVid skipped (--no-camvid)")
    elif not (camvid / "val").is_dir():
        print(f"CamVid sample not found at {camvid}: benchmarking the embedded VOC sample only", file=sys.stderr)
    else:
        out.append({"name": "camvid-sample", "spec": "CamVid", "layout": "camvid", "root": str(camvid),
                    "limit": args.images})
    return out


def experiment(name: str, store: Path, datasets: list[dict[str, Any]], models: Mapping[str, str],
               methods: list[dict[str, Any]], window_batch: int):
    from flows.config import parse_experiment

    return parse_experiment({
        "name": name, "store": str(store), "datasets": datasets, "models": dict(models),
        # stage by stage: each stage's wall, peak RSS and CPU seconds are measured over its own time span (a fused
        # run interleaves the stages of a batch; bench/scale.py compares the two modes)
        "regions": {"source": "sam"}, "methods": methods, "runner": {"kind": "local", "workers": 1, "fuse": False},
        "window_batch": window_batch,
    }, source=f"bench:{name}")


def corrclip(tau: float) -> dict[str, Any]:
    return {"name": "corrclip", "method": "corrclip", "params": {"tau": tau}}


def timed_run(exp) -> tuple[Any, float]:
    """``run_experiment`` and its wall time; any failed image aborts the benchmark."""
    from measure import wait_quiet

    from flows.pipeline import run_experiment

    wait_quiet()
    t0 = time.perf_counter()
    summary = run_experiment(exp, progress=False)
    seconds = time.perf_counter() - t0
    if summary.failed:
        bad = [f for s in summary.stages for f in s.failures if f[1] not in ("SkippedUpstream",)]
        raise RuntimeError(f"experiment {exp.name}: {summary.failed} failed images, e.g. {bad[:3]}")
    return summary, seconds


def recomputed(summary) -> list[str]:
    """Stage names that computed at least one item in a run, in stage order."""
    from tasks.stages import STAGE_ORDER

    done = {s.stage for s in summary.stages if s.done}
    return [s for s in STAGE_ORDER if s in done]


def item_bytes(store: Path, stage: str, key: str) -> tuple[int, int]:
    """(bytes on disk, items) of one stage output set: its packs and completion records (docs/store.md)."""
    from storage.store import Store

    base = store / "stages" / stage / key
    total = sum(p.stat().st_size for folder in ("packs", "records") for p in (base / folder).glob("*") if p.is_file())
    return total, len(Store(str(store)).complete_items(stage, key))


def manifest_rows(store: Path, dataset: str) -> list[dict[str, Any]]:
    from storage.store import Store
    from storage.tables import read_table

    rows = read_table(Store(str(store)), "manifests", [dataset]).to_pylist()
    return [r for r in rows if r.get("status", "ok") == "ok"]


def seed_text(seed: Path | None, store: Path) -> None:
    """Copy the text embeddings of the seed store into a fresh store (no-op without a seed).

    Copies the store marker and the ``stages/text_embeddings/<key>`` folders (docs/store.md).
    """
    if seed is None:
        return
    store.mkdir(parents=True, exist_ok=False)
    shutil.copy2(seed / "ovseg-store.json", store / "ovseg-store.json")
    shutil.copytree(seed / "stages" / "text_embeddings", store / "stages" / "text_embeddings")


def text_seed(datasets: list[dict[str, Any]], models: Mapping[str, str], work: Path,
              window_batch: int) -> tuple[Path, dict[str, float]]:
    """Compute every vocabulary's text embeddings once (the pipeline's own stage); seconds per dataset."""
    seed = work / "text-seed"
    exp = experiment("bench", seed, datasets, models, [corrclip(TAU_FIRST)], window_batch)
    from measure import wait_quiet

    from flows.pipeline import run_experiment

    wait_quiet()
    summary = run_experiment(exp, progress=False, only_stages=["text_embeddings"])
    if summary.failed:
        raise RuntimeError(f"text embeddings failed: {[f for s in summary.stages for f in s.failures][:3]}")
    return seed, {s.dataset: s.ended - s.started for s in summary.stages if s.stage == "text_embeddings"}


def one_repeat(rep: int, args: argparse.Namespace, models: Mapping[str, str], datasets: list[dict[str, Any]],
               rss, work: Path, count: bool, seed: Path | None) -> dict[str, Any]:
    """One repeat: cold run, bare forwards, incremental rerun, warm and cold second experiment."""
    from bare import MODEL_STAGES, bare_stage
    from measure import count_flops, wait_quiet

    from flows.graph import build_plan
    from storage.maintenance import list_stages
    from storage.store import Store
    from tasks.runtime import RunSettings, StageContext

    warm_store, cold_store = work / f"r{rep}-store", work / f"r{rep}-cold-store"
    exp_a = experiment("bench", warm_store, datasets, models, [corrclip(TAU_FIRST)], args.window_batch)
    seed_text(seed, warm_store)
    seed_text(seed, cold_store)
    log.info("repeat %d: cold run", rep)
    summary, t_full = timed_run(exp_a)
    store = Store(str(warm_store))
    plans = {p.dataset.name: p for p in build_plan(exp_a)}
    stages = []
    for s in summary.stages:
        if s.stage == "ingest" or not s.done:  # cached (seeded text embeddings): nothing to measure
            continue
        rows = manifest_rows(warm_store, s.dataset) if s.stage != "text_embeddings" else [{"image_id": "vocab"}]
        wall = s.ended - s.started
        nbytes, nitems = item_bytes(warm_store, s.stage, s.key)
        row = {"dataset": s.dataset, "stage": s.stage, "key": s.key, "items": s.done, "wall_seconds": wall,
               "compute_seconds": s.seconds, "items_per_second": s.done / wall if wall > 0 else None,
               "bytes_per_item": nbytes / max(nitems, 1),
               "peak_rss_bytes": rss.peak(s.started, s.ended), "cpu_seconds": rss.cpu_seconds(s.started, s.ended)}
        if s.stage in MODEL_STAGES:
            log.info("repeat %d: bare %s on %s", rep, s.stage, s.dataset)
            wait_quiet()
            ctx = StageContext(plans[s.dataset].nodes[(s.stage, s.key)],
                               RunSettings(str(warm_store), exp_a.device, exp_a.window_batch, exp_a.models.weights_dir))
            bare = bare_stage(ctx, rows, count_flops if count else None)
            if bare is not None:
                row.update({"bare_seconds": bare.seconds, "windows": bare.windows,
                            "overhead_ratio": wall / bare.seconds if bare.seconds > 0 else None,
                            "bare_cpu_seconds": bare.cpu_seconds,
                            "cpu_overhead_ratio": row["cpu_seconds"] / bare.cpu_seconds if bare.cpu_seconds > 0 else None,
                            "flops_per_window": bare.flops_per_window})
        stages.append(row)
    store_bytes = {f"{i.stage}/{i.key}": i.nbytes for i in list_stages(store)}
    store_files = sum(1 for p in warm_store.rglob("*") if p.is_file())

    log.info("repeat %d: incremental rerun (tau %s -> %s)", rep, TAU_FIRST, TAU_RERUN)
    exp_a2 = experiment("bench", warm_store, datasets, models, [corrclip(TAU_RERUN)], args.window_batch)
    summary2, t_incr = timed_run(exp_a2)

    methods_b = [corrclip(TAU_FIRST), dict(EXTRA_METHOD)]
    log.info("repeat %d: second experiment, warm store", rep)
    summary_bw, t_bwarm = timed_run(experiment("bench-b", warm_store, datasets, models, methods_b, args.window_batch))
    log.info("repeat %d: second experiment, cold store", rep)
    _, t_bcold = timed_run(experiment("bench-b", cold_store, datasets, models, methods_b, args.window_batch))
    shutil.rmtree(cold_store, ignore_errors=True)
    shutil.rmtree(warm_store, ignore_errors=True)
    return {
        "repeat": rep, "first_run_seconds": t_full, "stages": stages, "store_bytes_by_stage_key": store_bytes,
        "store_files": store_files,
        "incremental": {"rerun_seconds": t_incr, "ratio": t_incr / t_full, "recomputed": recomputed(summary2)},
        "cache_hit": {"warm_seconds": t_bwarm, "cold_seconds": t_bcold, "ratio": t_bwarm / t_bcold,
                      "recomputed": recomputed(summary_bw)},
    }


def prefect_startup_seconds() -> float:
    """Wall time of a trivial flow: the ephemeral Prefect server start-up (once per process)."""
    from prefect import flow

    @flow(name="bench-warmup")
    def warmup() -> int:
        return 0

    t0 = time.perf_counter()
    warmup()
    return time.perf_counter() - t0


def preload_models(models: Mapping[str, str]) -> dict[str, float]:
    """Load every backbone once into the per-process cache the stage tasks use; seconds per model."""
    from tasks.runtime import get_backbone

    out = {}
    for family, name in models.items():
        t0 = time.perf_counter()
        get_backbone(name)  # the stages load float32 on the CPU: the same cache entry
        out[family] = time.perf_counter() - t0
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from flows.cli import configure_prefect

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="ovseg-bench-", dir=args.workdir))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))  # private server database: no shared locks
    configure_prefect()

    from measure import RssSampler, machine_info, matmul_gflops
    from report import summarise, write_outputs

    models = models_for(args)
    datasets = dataset_entries(args)
    machine = machine_info()
    log.info("matmul rate")
    machine["matmul_gflops"] = matmul_gflops()
    t_start = time.time()
    try:
        with RssSampler() as rss:
            log.info("prefect start-up")
            startup = prefect_startup_seconds()
            log.info("model loads")
            loads = preload_models(models)
            seed, text_seconds = None, {}
            if not args.cold_text:
                log.info("text embeddings (once, seeded into every fresh store)")
                seed, text_seconds = text_seed(datasets, models, work, args.window_batch)
            repeats = [one_repeat(r, args, models, datasets, rss, work, count=(r == 0), seed=seed)
                       for r in range(args.repeats)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = summarise(
        repeats, machine=machine, models=models, datasets=datasets, args=vars(args),
        command=" ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
        prefect_startup_seconds=startup, model_load_seconds=loads, text_embeddings_seconds=text_seconds, process_peak_rss_bytes=rss.peak(),
        children_peak_rss_bytes=rss.children_peak(), total_seconds=time.time() - t_start,
        overhead_target=OVERHEAD_TARGET, incremental_target=INCREMENTAL_TARGET, incremental_stages=INCREMENTAL_STAGES,
    )
    json_path, md_path = write_outputs(results, Path(args.out))
    print(Path(md_path).read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
