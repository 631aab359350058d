"""Benchmark results: medians over repeats (``summarise``) and the JSON / Markdown files (``write_outputs``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bare import MODEL_STAGES
from measure import median

STAGE_FIELDS = ("wall_seconds", "compute_seconds", "items_per_second", "bytes_per_item", "peak_rss_bytes",
                "bare_seconds", "overhead_ratio", "cpu_seconds", "bare_cpu_seconds", "cpu_overhead_ratio",
                "achieved_gflops", "bare_gflops", "fraction_of_matmul")
TOTAL_FIELDS = ("wall_seconds", "bare_seconds", "overhead_ratio", "cpu_seconds", "bare_cpu_seconds", "cpu_overhead_ratio",
                "achieved_gflops", "bare_gflops", "fraction_of_matmul")


def _in_stage_order(names: Iterable[str]) -> list[str]:
    """Distinct stage names in pipeline order."""
    from flows.graph import STAGE_ORDER

    found = set(names)
    return [s for s in STAGE_ORDER if s in found]


def _rates(row: dict[str, Any], flops: float | None, matmul: float) -> None:
    """Add achieved GFLOP/s in the pipeline and bare, and the fraction of the matmul rate, to ``row``."""
    if flops is None:
        return
    row["achieved_gflops"] = flops / row["wall_seconds"] / 1e9 if row["wall_seconds"] > 0 else None
    bare = row.get("bare_seconds")
    row["bare_gflops"] = flops / bare / 1e9 if bare else None
    row["fraction_of_matmul"] = row["achieved_gflops"] / matmul if row["achieved_gflops"] is not None else None


def summarise(repeats: Sequence[Mapping[str, Any]], *, machine: Mapping[str, Any], models: Mapping[str, str],
              datasets: Sequence[Mapping[str, Any]], args: Mapping[str, Any], command: str,
              prefect_startup_seconds: float, model_load_seconds: Mapping[str, float],
              text_embeddings_seconds: Mapping[str, float], process_peak_rss_bytes: int,
              children_peak_rss_bytes: int, total_seconds: float, overhead_target: float, incremental_target: float,
              incremental_stages: Sequence[str]) -> dict[str, Any]:
    """Medians over repeats of every per-stage figure and ratio (ratios computed within each repeat)."""
    matmul = float(machine["matmul_gflops"])
    flops_pw = {(s["dataset"], s["stage"]): s.get("flops_per_window") for s in repeats[0]["stages"]}
    per_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    totals_rep: dict[str, list[dict[str, Any]]] = {}
    for rep in repeats:
        by_stage: dict[str, dict[str, Any]] = {}
        for s in rep["stages"]:
            row = dict(s)
            fpw = flops_pw.get((s["dataset"], s["stage"]))
            flops = fpw * s["windows"] if fpw is not None and "windows" in s else None
            row["flops"] = flops
            _rates(row, flops, matmul)
            per_key.setdefault((s["dataset"], s["stage"]), []).append(row)
            if s["stage"] in MODEL_STAGES and row.get("bare_seconds") is not None:
                t = by_stage.setdefault(s["stage"], {"wall_seconds": 0.0, "bare_seconds": 0.0, "cpu_seconds": 0.0,
                                                     "bare_cpu_seconds": 0.0, "flops": 0.0, "items": 0})
                for f in ("wall_seconds", "bare_seconds", "cpu_seconds", "bare_cpu_seconds"):
                    t[f] += row[f]
                t["items"] += row["items"]
                t["flops"] = None if t["flops"] is None or flops is None else t["flops"] + flops
        for stage, t in by_stage.items():
            t["overhead_ratio"] = t["wall_seconds"] / t["bare_seconds"] if t["bare_seconds"] > 0 else None
            t["cpu_overhead_ratio"] = t["cpu_seconds"] / t["bare_cpu_seconds"] if t["bare_cpu_seconds"] > 0 else None
            _rates(t, t["flops"], matmul)
            totals_rep.setdefault(stage, []).append(t)

    stages = []
    for (dataset, stage), rows in per_key.items():
        out = {"dataset": dataset, "stage": stage, "key": rows[0]["key"], "items": rows[0]["items"],
               "windows": rows[0].get("windows"), "flops_per_window": rows[0].get("flops_per_window")}
        out.update({f: median([r.get(f) for r in rows]) for f in STAGE_FIELDS})
        stages.append(out)
    model_stages = []
    for stage in MODEL_STAGES:
        if stage not in totals_rep:
            continue
        rows = totals_rep[stage]
        out = {"stage": stage, "items": rows[0]["items"], "flops": rows[0]["flops"]}
        out.update({f: median([r.get(f) for r in rows]) for f in TOTAL_FIELDS})
        out["overhead_target_met"] = out["overhead_ratio"] is not None and out["overhead_ratio"] <= overhead_target
        model_stages.append(out)

    first = median([r["first_run_seconds"] for r in repeats])
    inc_ratio = median([r["incremental"]["ratio"] for r in repeats])
    inc_recomputed = _in_stage_order(s for r in repeats for s in r["incremental"]["recomputed"])
    results = {
        "command": command,
        "args": dict(args),
        "machine": dict(machine),
        "models": dict(models),
        "random_weights": True,
        "datasets": [{"name": d["name"], "spec": d["spec"], "images": next(
            (s["items"] for s in stages if s["dataset"] == d["name"] and s["stage"] == "sam_masks"), None)} for d in datasets],
        "repeats": len(repeats),
        "prefect_startup_seconds": prefect_startup_seconds,
        "model_load_seconds": dict(model_load_seconds),
        "text_embeddings_seconds": dict(text_embeddings_seconds),
        "text_embeddings_in_cold_runs": not text_embeddings_seconds,
        "process_peak_rss_bytes": process_peak_rss_bytes,
        "prefect_server_peak_rss_bytes": children_peak_rss_bytes,
        "benchmark_wall_seconds": total_seconds,
        "first_run_seconds": first,
        "first_run_images_per_second": None,
        "stages": stages,
        "model_stages": model_stages,
        "incremental": {
            "change": "methods[corrclip].params.tau 4.0 -> 3.0",
            "first_run_seconds": first,
            "rerun_seconds": median([r["incremental"]["rerun_seconds"] for r in repeats]),
            "ratio": inc_ratio,
            "target": incremental_target,
            "target_met": inc_ratio is not None and inc_ratio <= incremental_target,
            "recomputed": inc_recomputed,
            "recomputed_only_expected": set(inc_recomputed) <= set(incremental_stages),
            "expected": list(incremental_stages),
        },
        "cache_hit": {
            "change": "second experiment bench-b = bench + method corrclip-beta0.25 (shares every upstream stage)",
            "warm_seconds": median([r["cache_hit"]["warm_seconds"] for r in repeats]),
            "cold_seconds": median([r["cache_hit"]["cold_seconds"] for r in repeats]),
            "ratio": median([r["cache_hit"]["ratio"] for r in repeats]),
            "recomputed": _in_stage_order(s for r in repeats for s in r["cache_hit"]["recomputed"]),
        },
        "overhead": {
            "target": overhead_target,
            "target_met": bool(model_stages) and all(m["overhead_target_met"] for m in model_stages),
            "worst_stage": max(model_stages, key=lambda m: m["overhead_ratio"] or 0.0)["stage"] if model_stages else None,
        },
        "per_repeat": list(repeats),
    }
    images = sum(d["images"] or 0 for d in results["datasets"])
    results["first_run_images_per_second"] = images / first if first else None
    return results


def _fmt(x: Any, spec: str = ".2f", scale: float = 1.0) -> str:
    if x is None:
        return "-"
    return format(x / scale, spec)


def markdown(r: Mapping[str, Any]) -> str:
    """The results as Markdown: headline ratios, per-stage table, model-stage totals, machine."""
    m = r["machine"]
    inc, ch, ov = r["incremental"], r["cache_hit"], r["overhead"]
    lines = [
        f"Command: `{r['command']}`  ",
        f"Models (random init, real architectures): {', '.join(r['models'].values())}  ",
        "Datasets: " + ", ".join(f"{d['name']} ({d['images']} images)" for d in r["datasets"])
        + f"; medians of {r['repeats']} repeat(s)  ",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cores']} logical), "
        f"torch {m['torch']} with {m['torch_threads']} threads, float32 matmul {m['matmul_gflops']:.1f} GFLOP/s, "
        f"load average at start {m['load_average_1min_at_start']:.2f} (shared machine)",
        "",
        "| headline | value | target |",
        "|---|---|---|",
        f"| first (cold) run | {_fmt(r['first_run_seconds'], '.1f')} s, {_fmt(r['first_run_images_per_second'], '.3f')} img/s | |",
        f"| overhead ratio, worst model stage ({ov['worst_stage']}) | "
        f"{_fmt(max((x['overhead_ratio'] or 0) for x in r['model_stages']) if r['model_stages'] else None, '.3f')} | "
        f"<= {ov['target']:.2f} {'met' if ov['target_met'] else 'NOT met'} |",
        f"| incremental ratio ({inc['change']}) | {_fmt(inc['ratio'], '.4f')} "
        f"({_fmt(inc['rerun_seconds'], '.1f')} s / {_fmt(inc['first_run_seconds'], '.1f')} s) | "
        f"<= {inc['target']:.2f} {'met' if inc['target_met'] else 'NOT met'} |",
        f"| incremental rerun recomputed | {', '.join(inc['recomputed']) or 'nothing'} | only {', '.join(inc['expected'])}: "
        f"{'yes' if inc['recomputed_only_expected'] else 'NO'} |",
        f"| cache-hit ratio ({ch['change']}) | {_fmt(ch['ratio'], '.4f')} "
        f"({_fmt(ch['warm_seconds'], '.1f')} s warm / {_fmt(ch['cold_seconds'], '.1f')} s cold; recomputed "
        f"{', '.join(ch['recomputed']) or 'nothing'}) | |",
        f"| Prefect ephemeral server start-up (once per process, excluded) | {r['prefect_startup_seconds']:.1f} s | |",
        "| model loads (once per process, excluded) | "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r["model_load_seconds"].items()) + " | |",
        "| text embeddings (" + ("computed in every cold run" if r["text_embeddings_in_cold_runs"] else
                                 "once per process, seeded into every fresh store, excluded") + ") | "
        + (", ".join(f"{k} {v:.1f} s" for k, v in r["text_embeddings_seconds"].items()) or "in the stage table") + " | |",
        f"| peak RSS, whole process | {_fmt(r['process_peak_rss_bytes'], '.0f', 2**20)} MiB "
        f"(+ Prefect server {_fmt(r['prefect_server_peak_rss_bytes'], '.0f', 2**20)} MiB) | |",
        f"| benchmark wall time | {r['benchmark_wall_seconds']:.0f} s | |",
        "",
        "Per stage (first cold run; wall = stage interval in the pipeline; bare = the same `ovseg_core` calls "
        "without store or Prefect; FLOPs counted on the first image):",
        "",
        "| dataset | stage | items | wall s | items/s | KiB/item | peak RSS MiB | bare s | overhead | overhead (CPU s) | "
        "GFLOP/window | GFLOP/s pipeline | GFLOP/s bare | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        lines.append(
            f"| {s['dataset']} | {s['stage']} | {s['items']} | {_fmt(s['wall_seconds'])} | {_fmt(s['items_per_second'])} | "
            f"{_fmt(s['bytes_per_item'], '.1f', 1024)} | {_fmt(s['peak_rss_bytes'], '.0f', 2**20)} | "
            f"{_fmt(s['bare_seconds'])} | {_fmt(s['overhead_ratio'], '.3f')} | {_fmt(s['cpu_overhead_ratio'], '.3f')} | "
            f"{_fmt(s['flops_per_window'], '.1f', 1e9)} | "
            f"{_fmt(s['achieved_gflops'], '.1f')} | {_fmt(s['bare_gflops'], '.1f')} | {_fmt(s['fraction_of_matmul'], '.0%')} |")
    lines += [
        "",
        "Model stages over all datasets:",
        "",
        "| stage | images | wall s | bare s | overhead (target <= 1.10) | CPU s | bare CPU s | overhead (CPU s) | GFLOP | "
        "GFLOP/s pipeline | GFLOP/s bare | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["model_stages"]:
        lines.append(
            f"| {s['stage']} | {s['items']} | {_fmt(s['wall_seconds'])} | {_fmt(s['bare_seconds'])} | "
            f"{_fmt(s['overhead_ratio'], '.3f')} {'ok' if s['overhead_target_met'] else 'over'} | {_fmt(s['cpu_seconds'])} | "
            f"{_fmt(s['bare_cpu_seconds'])} | {_fmt(s['cpu_overhead_ratio'], '.3f')} | {_fmt(s['flops'], '.1f', 1e9)} | "
            f"{_fmt(s['achieved_gflops'], '.1f')} | {_fmt(s['bare_gflops'], '.1f')} | {_fmt(s['fraction_of_matmul'], '.0%')} |")
    lines += ["", "Random weights: timings are representative of the architectures; no quality figure is measured.", ""]
    return "\n".join(lines)


def write_outputs(results: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
