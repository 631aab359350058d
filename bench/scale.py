"""Scale benchmark (``python bench/scale.py``): the pipeline's own costs at corpus sizes.

Part 1, real runs: synthetic 160x120 images with ground truth, tiny random models (``clip:tiny``,
``dino:tiny8``), SLIC regions, CorrCLIP + SC-CLIP with 112-pixel windows (two per image), at each
``--sizes`` N and for each of ``--modes`` (``fused``: ``runner.fuse: true``, the default;
``staged``: stage by stage), ``--repeat`` times, the modes alternating within each repetition so
their ratio is taken under the same machine load: a cold run (per stage: wall, compute, fixed cost
per image = (wall - compute) / images; a fused stage's wall is its share of the chain batches),
image decodes per image (counted in the real decode functions: ingest, and the stages' image and
ground-truth reads), files and bytes per image in the store, peak RSS, planning time and a no-op
rerun. Figures are medians over the repetitions; ratios fused / staged are medians of the
per-repetition ratios.

Part 2, ``--simulate N`` (default 100k): the bookkeeping alone. N image files (8x8 PNGs) and a
store holding every stage output of the same experiment for all N images, written by the store's
own pack writer with small stand-in arrays (no model compute); then the planning time, the time
to read each stage's completion state in a fresh process view, and a no-op rerun.

Outputs ``<out>/scale.json`` and ``<out>/scale.md``. Prefect's server start-up happens once,
before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLASSES = ["sky", "grass", "road, street", "building"]
# Windows at the images' own scale (no upscaling to the presets' 336-448 pixels), so that the
# pipeline's own per-image costs are visible next to the tiny models' compute.
WINDOW = {"short_side": 112, "crop": 112, "stride": 112}
log = logging.getLogger("ovseg.bench.scale")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000], help="image counts of the real runs")
    p.add_argument("--simulate", type=int, default=100000, help="image count of the bookkeeping simulation (0: skip)")
    p.add_argument("--batch-size", type=int, default=8, help="runner.batch_size (images per task and per pack)")
    p.add_argument("--modes", nargs="*", default=["fused", "staged"], choices=["fused", "staged"],
                   help="execution modes of the real runs (runner.fuse true / false), alternating per repetition")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of each real run (figures: medians)")
    p.add_argument("--summarise", default=None, metavar="RUNS_JSON", help="only summarise the runs an earlier "
                   "(maybe unfinished) call saved in <out>/scale-runs.json")
    p.add_argument("--out", default=str(REPO / "bench" / "out"))
    p.add_argument("--workdir", default=None, help="parent of the temporary images and stores (deleted at the end)")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.simulate < 0 or args.batch_size < 1 or args.repeat < 1:
        p.error("sizes, --batch-size and --repeat must be >= 1, --simulate >= 0")
    return args


def make_images(root: Path, n: int, size: tuple[int, int] = (160, 120), seed: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic RGB JPEGs (smooth random colour fields) and 4-class PNG ground truths."""
    img_dir, gt_dir = root / "images", root / "gt"
    for d in (img_dir, gt_dir):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        coarse = rng.integers(0, 256, (h // 20 + 1, w // 20 + 1, 3), dtype=np.uint8)
        rgb = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        Image.fromarray(rgb).save(img_dir / f"img{i:06d}.jpg", quality=90)
        Image.fromarray((rgb[..., 0] // 64).astype(np.uint8)).save(gt_dir / f"img{i:06d}.png")
    return img_dir, gt_dir


def make_tiny_files(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` 8x8 images and ground truths with identical bytes (ids still differ: they hash the path too)."""
    img_dir, gt_dir = root / "images", root / "gt"
    for d in (img_dir, gt_dir):
        d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "one.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "one-gt.png")
    img, gt = (root / "one.png").read_bytes(), (root / "one-gt.png").read_bytes()
    for i in range(n):
        (img_dir / f"img{i:06d}.png").write_bytes(img)
        (gt_dir / f"img{i:06d}.png").write_bytes(gt)
    return img_dir, gt_dir


def experiment(store: Path, img_dir: Path, gt_dir: Path, batch_size: int, fuse: bool = True):
    from flows.config import parse_experiment

    return parse_experiment({
        "name": "scale", "store": str(store),
        "datasets": [{"name": "synth", "layout": "folder", "root": str(img_dir), "gt_dir": str(gt_dir),
                      "classes": CLASSES}],
        "models": {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0"},
        "regions": {"source": "slic", "params": {"n_segments": 40}},
        "methods": [{"name": "corrclip", "method": "corrclip", "window": WINDOW},
                    {"name": "scclip", "method": "scclip", "window": WINDOW}],
        "runner": {"kind": "local", "workers": 1, "batch_size": batch_size, "fuse": fuse},
        "text_templates": "single",
    }, source="bench/scale.py")


def store_files(store: Path) -> tuple[int, int]:
    """(files, bytes) under the store's ``stages`` folder."""
    files = nbytes = 0
    for p in (store / "stages").rglob("*"):
        if p.is_file():
            files += 1
            nbytes += p.stat().st_size
    return files, nbytes


def stage_files(store: Path, stage: str, key: str) -> tuple[int, int]:
    base = store / "stages" / stage / key
    files = [p for p in base.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def timed(fn):
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def real_run(n: int, work: Path, batch_size: int, fuse: bool = True) -> dict[str, Any]:
    from measure import DecodeCounter, RssSampler, wait_quiet

    from flows.graph import build_plan
    from flows.pipeline import run_experiment

    log.info("%d images (%s): generating", n, "fused" if fuse else "staged")
    img_dir, gt_dir = make_images(work / f"data-{n}", n)
    store = work / f"store-{n}"
    exp = experiment(store, img_dir, gt_dir, batch_size, fuse)
    _, plan_s = timed(lambda: build_plan(exp))
    wait_quiet()
    log.info("%d images: cold run", n)
    cpu0 = time.process_time()  # CPU seconds of this process (all threads): less sensitive to other load than wall
    with RssSampler() as rss, DecodeCounter() as decodes:
        summary, cold_s = timed(lambda: run_experiment(exp, progress=False))
    cold_cpu = time.process_time() - cpu0
    if summary.status != "complete":
        raise RuntimeError(f"the cold run ended {summary.status}: {[f for s in summary.stages for f in s.failures][:3]}")
    stages = []
    for s in summary.stages:
        if s.stage == "ingest":
            continue
        wall = s.ended - s.started
        files, nbytes = stage_files(store, s.stage, s.key)
        items = max(s.done, 1)
        stages.append({"stage": s.stage, "key": s.key, "items": s.done, "wall_seconds": wall,
                       "compute_seconds": s.seconds, "ms_per_image": 1000 * wall / items,
                       "fixed_ms_per_image": 1000 * max(wall - s.seconds, 0.0) / items,
                       "files_per_image": files / n, "bytes_per_image": nbytes / n})
    files, nbytes = store_files(store)
    wait_quiet()
    log.info("%d images: no-op rerun", n)
    again, noop_s = timed(lambda: run_experiment(exp, progress=False))
    assert again.computed == 0, "the rerun recomputed outputs"
    shutil.rmtree(work / f"data-{n}", ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    per_image = [x for x in stages if x["stage"] != "text_embeddings"]  # one item per vocabulary, not per image
    return {"images": n, "mode": "fused" if fuse else "staged", "plan_seconds": plan_s, "cold_seconds": cold_s,
            "noop_rerun_seconds": noop_s, "cold_cpu_seconds_per_image": cold_cpu / n, "decodes_per_image": {k: v / n for k, v in decodes.counts.items()},
            "stage_seconds_per_image": sum(x["wall_seconds"] for x in per_image) / n,
            "fixed_seconds_per_image": sum(max(x["wall_seconds"] - x["compute_seconds"], 0.0) for x in per_image) / n,
            "text_embeddings_seconds": sum(x["wall_seconds"] for x in stages if x["stage"] == "text_embeddings"),
            "files_per_image": files / n, "bytes_per_image": nbytes / n, "peak_rss_bytes": rss.peak(),
            "stages": stages}


def fill_store(exp, n_batches_hint: int) -> dict[str, float]:
    """Write every stage output of the plan for every image, as packs of ``batch_size`` with stand-in arrays."""
    from flows.graph import build_plan
    from flows.ingest import ingest_dataset
    from storage.store import Store

    store = Store(exp.store)
    (plan,) = build_plan(exp)
    rows = ingest_dataset(store, plan, progress=False)
    ids = [r["image_id"] for r in rows if r["status"] == "ok"]
    k = len(CLASSES)
    seconds = {}
    for node in plan.ordered():
        t0 = time.perf_counter()
        items = ["vocab"] if node.stage == "text_embeddings" else ids
        arrays = {"x": np.zeros((2, 2), np.float16)}
        if node.stage == "scoring":
            arrays = {"confusion": np.eye(k + 1, k, dtype=np.int64)}
        if node.stage == "text_embeddings":
            arrays = {"embeddings": np.zeros((k, 4), np.float32), "query_to_class": np.arange(k)}
        for start in range(0, len(items), exp.runner.batch_size):
            with store.open_pack(node.stage_key) as pack:
                for iid in items[start : start + exp.runner.batch_size]:
                    pack.add(iid, arrays, {})
        store.state(node.stage, node.key).compact()
        seconds[f"{node.stage}/{node.key}"] = time.perf_counter() - t0
    return seconds


def simulate(n: int, work: Path, batch_size: int) -> dict[str, Any]:
    from measure import RssSampler, wait_quiet

    from flows.graph import build_plan
    from flows.pipeline import run_experiment
    from storage.store import Store

    log.info("simulation, %d images: files", n)
    img_dir, gt_dir = make_tiny_files(work / f"sim-{n}", n)
    store_path = work / f"sim-store-{n}"
    exp = experiment(store_path, img_dir, gt_dir, batch_size)
    log.info("simulation, %d images: filling the store (no model compute)", n)
    fill = fill_store(exp, n // batch_size)
    (plan,), plan_s = timed(lambda: build_plan(exp))
    fresh = Store(store_path)
    state_s = {}
    for node in plan.ordered():
        _, state_s[node.stage + "/" + node.key] = timed(lambda: fresh.state(node.stage, node.key).complete())
    files, nbytes = store_files(store_path)
    wait_quiet()
    log.info("simulation, %d images: no-op rerun", n)
    with RssSampler() as rss:
        summary, noop_s = timed(lambda: run_experiment(exp, progress=False))
    if summary.computed or summary.status != "complete":
        raise RuntimeError(f"the simulated no-op rerun computed {summary.computed} outputs ({summary.status})")
    ingest = next((s for s in summary.stages if s.stage == "ingest"), None)
    shutil.rmtree(work / f"sim-{n}", ignore_errors=True)
    shutil.rmtree(store_path, ignore_errors=True)
    return {"images": n, "fill_seconds": sum(fill.values()), "plan_seconds": plan_s,
            "state_seconds": state_s, "state_seconds_total": sum(state_s.values()),
            "noop_rerun_seconds": noop_s, "files_per_image": files / n, "bytes_per_image": nbytes / n,
            "peak_rss_bytes": rss.peak(), "ingest_failed": ingest.failed if ingest else 0}


def median_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The medians over repetitions of one (size, mode): every figure, per stage and per decode kind."""
    first, med = runs[0], lambda xs: float(np.median(xs))  # noqa: E731
    out = {k: med([r[k] for r in runs]) for k in first if isinstance(first[k], (int, float)) and k != "images"}
    out.update(images=first["images"], mode=first["mode"], repeats=len(runs), cold_seconds_all=[r["cold_seconds"] for r in runs],
               decodes_per_image={k: med([r["decodes_per_image"][k] for r in runs]) for k in first["decodes_per_image"]})
    keys = ("wall_seconds", "compute_seconds", "ms_per_image", "fixed_ms_per_image")
    out["stages"] = [{**s, **{k: med([r["stages"][i][k] for r in runs]) for k in keys}} for i, s in enumerate(first["stages"])]
    return out


def summarise(runs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Medians per (size, mode) and, per size, the medians of the per-repetition ratios fused / staged."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["images"], r["mode"]), []).append(r)
    real = [median_runs(g) for g in groups.values()]
    ratios = []
    for n in dict.fromkeys(r["images"] for r in runs):
        fused, staged = groups.get((n, "fused"), []), groups.get((n, "staged"), [])
        pairs = list(zip(fused, staged))  # same repetition: the modes ran back to back
        if pairs:
            ratios.append({"images": n, "pairs": len(pairs), **{
                k: float(np.median([f[k] / s[k] for f, s in pairs]))
                for k in ("cold_seconds", "cold_cpu_seconds_per_image", "stage_seconds_per_image",
                          "fixed_seconds_per_image")}})
    return real, ratios


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`  ", f"Machine: {results['machine']}", ""]
    real = results["real"]
    if real:
        lines += ["| images | mode | runs | cold run s (median) | cold run CPU ms per image | stage time per image ms (all stages) | "
                  "of which fixed (wall - compute) ms | largest fixed ms per stage and image | image decodes "
                  "per image: ingest + stages (GT: ingest + stages) | files / image | KiB / image | plan s | "
                  "no-op rerun s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in real:
            d = r["decodes_per_image"]
            per_image = [t for t in r["stages"] if t["stage"] != "text_embeddings"]
            lines.append(f"| {r['images']} | {r['mode']} | {r['repeats']} | {r['cold_seconds']:.1f} | "
                         f"{1000 * r['cold_cpu_seconds_per_image']:.1f} | "
                         f"{1000 * r['stage_seconds_per_image']:.1f} | {1000 * r['fixed_seconds_per_image']:.1f} | "
                         f"{max(t['fixed_ms_per_image'] for t in per_image):.1f} | "
                         f"{d['ingest_image']:.2f} + {d['stage_image']:.2f} ({d['ingest_gt']:.2f} + {d['stage_gt']:.2f}) | "
                         f"{r['files_per_image']:.2f} | {r['bytes_per_image'] / 1024:.1f} | {r['plan_seconds']:.2f} | "
                         f"{r['noop_rerun_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
        for q in results.get("ratios", []):
            lines += ["", f"Fused / staged, {q['images']} images, median of {q['pairs']} back-to-back pair(s): cold run "
                          f"{q['cold_seconds']:.2f}x (its CPU seconds {q['cold_cpu_seconds_per_image']:.2f}x), stage time "
                          f"per image {q['stage_seconds_per_image']:.2f}x, fixed part {q['fixed_seconds_per_image']:.2f}x"]
        lines += ["", "Text embeddings (one item per vocabulary, model load included) are not in the per-image "
                      "figures. Per stage (ms per image; in brackets the fixed part = wall - compute, which also "
                      "holds each stage's one-time model load; a fused stage's wall is its share of the chain "
                      "batches; files and KiB per image):", "",
                  "| stage | " + " | ".join(f"{r['images']} {r['mode']} ms (fixed)" for r in real)
                  + " | files / image | KiB / image |",
                  "|---|" + "---|" * len(real) + "---|---|"]
        for i, s in enumerate(real[0]["stages"]):
            cells = []
            for r in real:
                t = r["stages"][i]
                cells.append(f"{t['ms_per_image']:.1f} ({t['fixed_ms_per_image']:.1f})")
            lines.append(f"| {s['stage']} `{s['key'][:6]}` | " + " | ".join(cells)
                         + f" | {s['files_per_image']:.3f} | {s['bytes_per_image'] / 1024:.2f} |")
    sim = results.get("simulation")
    if sim:
        lines += ["", f"Bookkeeping simulation, {sim['images']} images, every stage output complete "
                      "(stand-in arrays, no model compute):", "",
                  "| figure | value |", "|---|---|",
                  f"| store files / image | {sim['files_per_image']:.2f} |",
                  f"| planning (build_plan) | {sim['plan_seconds']:.2f} s |",
                  f"| completion state of all {len(sim['state_seconds'])} stage outputs, fresh process | "
                  f"{sim['state_seconds_total']:.2f} s |",
                  f"| no-op rerun (ingest of unchanged files, plan, per-stage checks, scores), Prefect running | "
                  f"{sim['noop_rerun_seconds']:.1f} s |",
                  f"| peak RSS during the rerun | {sim['peak_rss_bytes'] / 2**20:.0f} MiB |",
                  f"| writing the simulated store | {sim['fill_seconds']:.0f} s |"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarise:
        return write_results(json.loads(Path(args.summarise).read_text()), Path(args.out))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    sys.path.insert(0, str(REPO / "bench"))
    work = Path(tempfile.mkdtemp(prefix="ovseg-scale-", dir=args.workdir))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    from flows.cli import configure_prefect

    configure_prefect()
    from measure import machine_info
    from run import prefect_startup_seconds

    info = machine_info()
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{info.get('cpu_model')}, {info.get('usable_cores')} usable cores, "
                   f"load average at start {info.get('load_average_1min_at_start'):.2f}",
        "real": [], "simulation": None}
    try:
        results["prefect_startup_seconds"] = prefect_startup_seconds()
        runs = results["runs"] = []
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for n in args.sizes:
            for _ in range(args.repeat):
                for mode in args.modes:
                    runs.append(real_run(n, work, args.batch_size, fuse=mode == "fused"))
                    (Path(args.out) / "scale-runs.json").write_text(json.dumps(results, indent=2, default=str))
        if args.simulate:
            results["simulation"] = simulate(args.simulate, work, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_results(results, Path(args.out))


def write_results(results: dict[str, Any], out: Path) -> int:
    """``scale.json`` and ``scale.md`` (printed) from the runs: medians per size and mode, ratios."""
    if results.get("runs"):
        results["real"], results["ratios"] = summarise(results["runs"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(results, indent=2, default=str))
    md = markdown(results)
    (out / "scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
