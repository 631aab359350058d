"""GPU benchmark of the ovseg pipeline (``bench/gpu.sh``; ``--device cpu --quick`` on any machine).

On the embedded VOC sample (``examples/data/voc2012-sample``), with random-init backbones of the real
architectures (CLIP ViT-B/16, DINO ViT-B/8, SAM ViT-B, CorrCLIPv2's C-RADIOv3-L; ``--quick``: the tiny
test configurations), for CorrCLIP, SC-CLIP and CorrCLIPv2, per compute dtype (``float32``, ``float16``,
``bfloat16``):

1. **cold runs** of the pipeline in fresh temporary stores: a first run (CUDA start-up, model loads,
   kernel autotuning: reported, not used), a measured run (wall time per stage and in all) and, on
   CUDA, a run under ``torch.profiler`` (the device time of its kernels and copies). The pipeline is
   ``flows.pipeline.run_experiment(orchestrate=False)`` (ovseg without Prefect: the local thread
   pool) where ``flows.pipeline`` imports, else (no matplotlib: the report's figures) the same
   executor (``tasks.executor.run_batch``) called per stage node after the same ingest: mode
   ``executor``, which leaves out the run journal, the completion listings and score aggregation;
2. **bare stage compute**: for every node of the graph, its inputs loaded untimed by the stage's own
   ``load`` from the measured run's store and grouped as the executor groups them, then only the
   stage's own ``compute`` timed: one warm-up pass, then ``--repeats`` passes timed with CUDA events
   (``time.perf_counter`` on the CPU); the median per image is reported, with the peak GPU memory
   of the passes (``torch.cuda.max_memory_allocated``; the models every stage keeps loaded included)
   and the part above what was allocated before them (the stage's working memory).

Shares of the measured cold run's wall time: **kernel share** = the profiled run's GPU kernel time
(union of kernel intervals, copies apart) / the measured run's wall; **compute share** = the sum of the
bare compute medians of every node / the measured run's wall. Random weights: no score is reported.
Writes ``<out>/gpu.json`` and ``gpu.md`` (and ``$OUT/gpu.json`` when ``OUT`` is set); prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VOC = REPO / "examples" / "data" / "voc2012-sample"
FULL_MODELS = {"clip": "clip:ViT-B-16@random:0", "dino": "dino:vitb8@random:0", "sam": "sam:vit_b@random:0",
               "vfm": "vfm:radiov3_l@random:0"}
TINY_MODELS = {"clip": "clip:tiny@random:0", "dino": "dino:tiny8@random:0", "sam": "sam:tiny@random:0",
               "vfm": "vfm:tiny_radiov3@random:0"}
METHODS = ("corrclip", "scclip", "corrclipv2")
DTYPES = ("float32", "float16", "bfloat16")
COPY_PREFIXES = ("memcpy", "memset")  # profiler device events that are copies, not kernels


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="torch device (default: cuda when visible, else cpu)")
    p.add_argument("--quick", action="store_true", help="tiny models, 1 image, 1 repeat, float32 only: a smoke test")
    p.add_argument("--images", type=int, default=None, help="VOC sample images (default 4; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per stage after a warm-up (default 3)")
    p.add_argument("--dtypes", default=None, help=f"comma-separated compute dtypes (default {','.join(DTYPES)}; "
                   "--quick float32)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: %(default)s)")
    p.add_argument("--window-batch", type=int, default=8, help="windows per network forward (default 8)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="a dtype that would end past this many seconds (judged by the previous one) is skipped "
                        "(default 450; gpu.sh stops the run at 480)")
    p.add_argument("--mode", choices=("auto", "flow", "executor"), default="auto",
                   help="pipeline path: flow (run_experiment without Prefect), executor (run_batch per stage node); "
                        "auto: flow where flows.pipeline imports (default)")
    p.add_argument("--no-profile", action="store_true", help="no profiled run (no kernel share)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"), help="folder for gpu.json and gpu.md")
    a = p.parse_args(argv)
    a.images = a.images or (1 if a.quick else 4)
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.dtypes = [d for d in (a.dtypes or ("float32" if a.quick else ",".join(DTYPES))).split(",") if d]
    a.methods = [m for m in a.methods.split(",") if m]
    if bad := [d for d in a.dtypes if d not in DTYPES]:
        p.error(f"--dtypes: unknown {bad}; valid: {', '.join(DTYPES)}")
    if bad := [m for m in a.methods if m not in METHODS]:
        p.error(f"--methods: unknown {bad}; valid: {', '.join(METHODS)}")
    return a


class Clock:
    """Elapsed time of a piece of work on ``device``: CUDA events on a GPU (the stream's time), else wall time."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(seconds on the device clock, wall seconds) of ``fn()``."""
        self.sync()
        t0 = time.perf_counter()
        if not self.cuda:
            fn()
            wall = time.perf_counter() - t0
            return wall, wall
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0, time.perf_counter() - t0


def experiment(store: Path, args: argparse.Namespace, device: str, dtype: str):
    from flows.config import parse_experiment

    models = TINY_MODELS if args.quick else FULL_MODELS
    return parse_experiment({
        "name": "gpu-bench", "store": str(store), "device": device, "dtype": dtype,
        "window_batch": args.window_batch, "models": dict(models), "regions": {"source": "sam"},
        "datasets": [{"name": "voc21-sample", "spec": "VOC21", "layout": "voc", "root": str(VOC),
                      "limit": args.images}],
        "methods": [{"name": m, "method": m} for m in args.methods],
        "runner": {"kind": "local", "workers": 1},
        # --quick: one prompt template (80 through a text tower per class would dominate a smoke test)
        "text_templates": "single" if args.quick else "imagenet80",
    }, source="bench:gpu")


def pipeline_mode() -> str:
    """``flow`` when ``flows.pipeline`` imports (ovseg's run without Prefect), else ``executor``."""
    try:
        import flows.pipeline  # noqa: F401
    except ImportError:
        return "executor"
    return "flow"


def cold_run(exp, mode: str, clock: Clock) -> dict[str, Any]:
    """One cold run of ``exp`` into its (fresh) store: wall seconds in all and per stage node."""
    clock.sync()
    t0 = time.perf_counter()
    stages = _run_flow(exp) if mode == "flow" else _run_executor(exp)
    clock.sync()
    return {"wall_seconds": time.perf_counter() - t0, "stages": stages}


def _run_flow(exp) -> list[dict[str, Any]]:
    from flows.pipeline import run_experiment

    summary = run_experiment(exp, progress=False, orchestrate=False)
    if summary.failed:
        raise RuntimeError(f"cold run: {summary.failed} failed items, e.g. "
                           f"{[f for s in summary.stages for f in s.failures][:3]}")
    return [{"stage": s.stage, "key": s.key, "items": s.done, "wall_seconds": s.ended - s.started}
            for s in summary.stages if s.stage != "ingest"]


def _run_executor(exp) -> list[dict[str, Any]]:
    from flows.graph import build_plan
    from flows.ingest import ingest_dataset
    from storage.store import Store
    from tasks.executor import run_batch
    from tasks.runtime import RunSettings, StageContext, open_store
    from tasks.stages import STAGES

    store = open_store(Store(exp.store, lease_ttl=exp.runner.lease_ttl).location, exp.runner.lease_ttl)
    settings = RunSettings(store.location, exp.device, exp.window_batch, exp.models.weights_dir, "gpu-bench",
                           exp.runner.lease_ttl)
    out = []
    for plan in build_plan(exp):
        rows = [r for r in ingest_dataset(store, plan, progress=False) if r.get("status", "ok") == "ok"]
        for node in plan.ordered():
            t0 = time.perf_counter()
            store.register_stage(node.stage_key, random_weights=node.random_weights)
            items = STAGES[node.stage].items(rows)
            results = []
            for i in range(0, len(items), exp.runner.batch_size):
                results += run_batch(StageContext(node, settings, plan.dataset.name),
                                     items[i: i + exp.runner.batch_size]).items
            if bad := [r for r in results if r.status != "done"]:
                raise RuntimeError(f"cold run: {node.stage} failed on {bad[0].item}: {bad[0].error_type}: {bad[0].error}")
            out.append({"stage": node.stage, "key": node.key, "items": len(results),
                        "wall_seconds": time.perf_counter() - t0})
    return out


def kernel_seconds(exp, mode: str, clock: Clock) -> dict[str, Any]:
    """A cold run under ``torch.profiler``: its wall, its GPU kernel time and its copies' time (``device_busy``)."""
    run, busy = device_busy(lambda: cold_run(exp, mode, clock), "CUDA")
    return {"wall_seconds": run["wall_seconds"], **busy}


def device_busy(fn: Callable[[], Any], device_type: str = "CUDA") -> tuple[Any, dict[str, Any]]:
    """``fn()`` under ``torch.profiler`` recording ``device_type`` activity (``CUDA``; ``CPU`` for tests).

    Returns its result and ``{"kernel_seconds": union of the intervals of that device's events other than
    copies, "copy_seconds": summed time of its copies (memcpy, memset), "kernels": events counted}``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[getattr(ProfilerActivity, device_type)]) as prof:
        result = fn()
    kernels, copies = [], 0.0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).split(".")[-1] != device_type:
            continue
        start, end = e.time_range.start, e.time_range.end  # microseconds
        if e.name.lower().startswith(COPY_PREFIXES):
            copies += (end - start) / 1e6
        else:
            kernels.append((start, end))
    return result, {"kernel_seconds": covered(kernels) / 1e6, "copy_seconds": copies, "kernels": len(kernels)}


def covered(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: kernels overlapping on several streams count once."""
    busy, last = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > last:
            busy += end - max(start, last)
            last = end
    return busy


def bare_nodes(exp, clock: Clock, repeats: int) -> list[dict[str, Any]]:
    """Every node's own ``compute`` on the measured run's store (inputs loaded untimed; see the module doc)."""
    import torch

    from flows.graph import build_plan, method_users
    from storage.store import Store
    from storage.tables import read_table
    from tasks.streams import Grouper
    from tasks.runtime import RunSettings, StageContext
    from tasks.stages import STAGES

    store = Store(exp.store)
    settings = RunSettings(store.location, exp.device, exp.window_batch, exp.models.weights_dir)
    out = []
    for plan in build_plan(exp):
        rows = [r for r in read_table(store, "manifests", [plan.dataset.name]).to_pylist()
                if r.get("status", "ok") == "ok"]
        users = method_users(plan)
        for node in plan.ordered():
            stage = STAGES[node.stage]
            ctx = StageContext(node, settings, plan.dataset.name)
            models = stage.models(ctx)
            grouper, groups = Grouper(stage, exp.window_batch), []
            items = stage.items(rows)
            for row in items:
                if (g := grouper.add(row, stage.load(ctx, row))) is not None:
                    groups.append(g)
            if (g := grouper.flush()) is not None:
                groups.append(g)

            def run() -> None:
                with torch.inference_mode():
                    for group in groups:
                        stage.compute(ctx, models, [inp for _, inp in group])

            run()  # warm-up
            before = None
            if clock.cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            timed = [clock.time(run) for _ in range(repeats)]
            peak = torch.cuda.max_memory_allocated() if clock.cuda else None
            n = max(len(items), 1)
            out.append({"stage": node.stage, "key": node.key, "methods": sorted(users.get(node.ident, ())),
                        "items": len(items), "device_seconds": statistics.median(t for t, _ in timed),
                        "wall_seconds": statistics.median(w for _, w in timed),
                        "ms_per_item": 1000 * statistics.median(t for t, _ in timed) / n,
                        "peak_bytes": peak, "working_bytes": None if peak is None else peak - before})
    return out


def bench_dtype(args: argparse.Namespace, device: str, dtype: str, mode: str, clock: Clock, work: Path
                ) -> dict[str, Any]:
    """First, measured and profiled cold runs and the bare stage timings of one compute dtype."""
    first = cold_run(experiment(work / f"{dtype}-first", args, device, dtype), mode, clock)
    exp = experiment(work / f"{dtype}-store", args, device, dtype)
    measured = cold_run(exp, mode, clock)
    profiled = None
    if clock.cuda and not args.no_profile:
        try:
            profiled = kernel_seconds(experiment(work / f"{dtype}-profiled", args, device, dtype), mode, clock)
        except Exception as e:  # noqa: BLE001 - the profiler is a measurement aid: its failure is reported
            profiled = {"error": f"{type(e).__name__}: {e}"}
    nodes = bare_nodes(exp, clock, args.repeats)
    wall = measured["wall_seconds"]
    compute = sum(n["device_seconds"] for n in nodes)
    out = {"dtype": dtype, "first_run_seconds": first["wall_seconds"], "cold_run": measured, "profiled_run": profiled,
           "nodes": nodes, "compute_seconds": compute, "compute_share": compute / wall if wall > 0 else None}
    if profiled and profiled.get("kernels"):  # no kernel event seen: no share (rather than a false 0 %)
        out["kernel_share"] = profiled["kernel_seconds"] / wall if wall > 0 else None
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    from tasks.runtime import software_versions

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "software": software_versions()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def markdown(res: dict[str, Any]) -> str:
    """The result tables (per-stage compute per dtype; pipeline shares)."""
    runs = res["dtypes"]
    names = [r["dtype"] for r in runs]
    unit = "GPU ms" if res["machine"]["device"].startswith("cuda") else "CPU ms"
    lines = [f"## ovseg GPU benchmark: {res['machine'].get('gpu', res['machine']['device'])}, pipeline mode "
             f"`{res['mode']}`, {res['args']['images']} VOC sample images, random weights", "",
             f"| stage | methods | " + " | ".join(f"{d} {unit}/item" for d in names) + " | "
             + " | ".join(f"{d} peak MiB (working)" for d in names) + " |",
             "|---|---|" + "---:|" * (2 * len(names))]
    base = {(n["stage"], n["key"]): n for n in runs[0]["nodes"]} if runs else {}
    order = [(n["stage"], tuple(n["methods"])) for n in base.values()]
    by_dtype = [{(n["stage"], tuple(n["methods"])): n for n in r["nodes"]} for r in runs]
    for key in order:
        cells = [f"{d[key]['ms_per_item']:.1f}" if key in d else "-" for d in by_dtype]
        mem = [(f"{d[key]['peak_bytes'] / 2**20:.0f} ({d[key]['working_bytes'] / 2**20:.0f})"
                if key in d and d[key]["peak_bytes"] is not None else "-") for d in by_dtype]
        lines.append(f"| {key[0]} | {','.join(key[1]) or '-'} | " + " | ".join(cells) + " | " + " | ".join(mem) + " |")
    lines += ["", "| dtype | first cold run s | cold run wall s | stage compute s | compute share | profiled wall s "
              "| kernel s | copies s | kernel share |", "|---|" + "---:|" * 8]
    for r in runs:
        p = r["profiled_run"] or {}
        f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)  # noqa: E731
        lines.append(f"| {r['dtype']} | {f(r['first_run_seconds'])} | {f(r['cold_run']['wall_seconds'])} | "
                     f"{f(r['compute_seconds'])} | {f(r['compute_share'], '{:.0%}')} | {f(p.get('wall_seconds'))} | "
                     f"{f(p.get('kernel_seconds'))} | {f(p.get('copy_seconds'))} | "
                     f"{f(r.get('kernel_share'), '{:.0%}')} |")
    if res["skipped"]:
        lines += ["", f"skipped (over --budget-s): {', '.join(res['skipped'])}"]
    lines += [f"failed: {d}: {why}" for d, why in res["failed"].items()]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out: Path) -> str:
    """Write ``gpu.json`` and ``gpu.md`` to ``out`` (and ``$OUT``); returns the Markdown."""
    md = markdown(res)
    for folder in (out, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
        (folder / "gpu.md").write_text(md)
    return md


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is visible to this process")
    clock, mode = Clock(device), pipeline_mode() if args.mode == "auto" else args.mode
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ovseg-gpu-bench-"))
    res = {"machine": machine(device), "mode": mode, "models": TINY_MODELS if args.quick else FULL_MODELS,
           "args": dict(vars(args)), "dtypes": [], "skipped": [], "failed": {},
           "command": " ".join(["bench/gpu.py", *(sys.argv[1:] if argv is None else argv)])}
    last = 0.0  # seconds the previous dtype took: a dtype that would end past --budget-s is not started
    try:
        for dtype in args.dtypes:
            elapsed = time.perf_counter() - t_start
            if elapsed + last > args.budget_s:
                res["skipped"].append(dtype)
                continue
            print(f"[gpu bench] {dtype} ({mode}) at {elapsed:.0f} s", file=sys.stderr, flush=True)
            try:
                res["dtypes"].append(bench_dtype(args, device, dtype, mode, clock, work))
            except Exception as e:  # noqa: BLE001 - one dtype that fails (an op without a half kernel) is reported
                res["failed"][dtype] = f"{type(e).__name__}: {e}"
                print(f"[gpu bench] {dtype} failed: {res['failed'][dtype]}", file=sys.stderr, flush=True)
            last = time.perf_counter() - t_start - elapsed
            res["total_seconds"] = time.perf_counter() - t_start
            write(res, Path(args.out))  # after each dtype: a run stopped by its time limit keeps what it measured
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write(res, Path(args.out)))
    return 1 if res["failed"] or not res["dtypes"] else 0


if __name__ == "__main__":
    sys.exit(main())
