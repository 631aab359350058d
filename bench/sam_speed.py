"""SAM automatic masks: seconds, FLOPs and share of the matmul rate, before / after / bfloat16.

Usage (from the repository root, the venv's Python)::

    python bench/sam_speed.py [--backbone sam:vit_b@random:0] [--images 2] [--repeats 3] [--threads 2]

Per image of the embedded VOC sample (first N by name) and per repeat, three region-map runs of
the same model and :class:`~ovseg_core.features.regions.SamRegionConfig` (``--setting``: CorrCLIP
paper defaults, ``permissive`` = thresholds off, ``no-nms`` = thresholds and NMS off), each
timed right after a measurement of this machine's float32 ``torch.mm`` rate
(``measure.matmul_gflops``; every ratio is taken within one repeat):

- ``before``: segment-anything's ``SamAutomaticMaskGenerator.generate`` (its predictor forced to
  single-mask output when the config asks for it) and the reference's ascending-area painting
  loop: the library path ovseg reproduced before;
- ``after``: :func:`~ovseg_core.features.regions.sam_regions` in float32 (must give the same map:
  checked on every image, the run fails otherwise);
- ``bf16``: the same with ``compute_dtype=torch.bfloat16`` (autocast; weights stay float32).

FLOPs per image are counted once per path with ``torch.utils.flop_counter`` (``measure.count_flops``).
``% of matmul`` = FLOPs / seconds / matmul rate, with the ``before`` path's FLOPs for every path
(the work the result requires as the library does it; ``after`` skips some of it) and, in
brackets, each path's own counted FLOPs (``bf16``: the float32 count of the same operations). Figures are medians over repeats and images.

bfloat16 movement vs float32 (per image): number of regions, pixels whose segmented/unsegmented
state differs, and pixels outside their float32 region's best-matching bfloat16 region (a
label-permutation-free count). Random weights pass nothing at the paper's 0.4 thresholds, so
movement is also reported for the ``no-nms`` setting (every prompt's mask kept) in the same run.

Writes JSON to ``--out`` (default ``bench/out/sam_speed.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from measure import count_flops, matmul_gflops

REPO = Path(__file__).resolve().parents[1]
VOC_JPEG = REPO / "examples" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
DEFAULT_OUT = REPO / "bench" / "out" / "sam_speed.json"
# --setting: the CorrCLIP paper defaults; thresholds off (NMS on); thresholds and NMS off (every
# prompt's mask survives: the most post-processing, the library's RLE round trip included).
SETTINGS = {
    "paper": {},
    "permissive": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "no-nms": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
}
MOVEMENT_SETTING = "no-nms"
TARGET_SHARE = 0.60


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="sam:vit_b@random:0", help="segment-anything v1 backbone (default sam:vit_b@random:0)")
    p.add_argument("--images", type=int, default=2, help="VOC sample images, first N by name (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per image and path (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--setting", choices=tuple(SETTINGS), default="paper",
                   help="generator parameters: paper defaults, thresholds off, or thresholds and NMS off (default paper)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 path")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output file")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--images, --repeats and --threads must be >= 1")
    return args


def library_regions(model: torch.nn.Module, image: np.ndarray, cfg) -> np.ndarray:
    """The library generator and the CorrCLIP reference's painting loop (ids by ascending area)."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    class SingleMaskPredictor(SamPredictor):
        def predict_torch(self, *args, multimask_output: bool = True, **kwargs):
            return super().predict_torch(*args, multimask_output=False, **kwargs)

    generator = SamAutomaticMaskGenerator(
        model,
        points_per_side=cfg.points_per_side,
        points_per_batch=cfg.points_per_batch,
        pred_iou_thresh=cfg.pred_iou_thresh,
        stability_score_thresh=cfg.stability_score_thresh,
        stability_score_offset=cfg.stability_score_offset,
        box_nms_thresh=cfg.box_nms_thresh,
        crop_n_layers=cfg.crop_n_layers,
        crop_nms_thresh=cfg.crop_nms_thresh,
        crop_overlap_ratio=cfg.crop_overlap_ratio,
        crop_n_points_downscale_factor=cfg.crop_n_points_downscale_factor,
        min_mask_region_area=cfg.min_mask_region_area,
    )
    if not cfg.multimask_output:
        generator.predictor = SingleMaskPredictor(model)
    ids = np.zeros(image.shape[:2], dtype=np.int32)
    for instance_id, ann in enumerate(sorted(generator.generate(image), key=lambda r: r["area"]), start=1):
        ids[ann["segmentation"]] = instance_id
    return ids


def movement(reference: np.ndarray, other: np.ndarray) -> dict[str, float | int]:
    """How far ``other``'s region map is from ``reference``'s (both ``(H, W)`` ids, 0 = unsegmented)."""
    ref, oth = reference.astype(np.int64).ravel(), other.astype(np.int64).ravel()
    cols = int(oth.max()) + 1
    table = np.bincount(ref * cols + oth, minlength=(int(ref.max()) + 1) * cols).reshape(-1, cols)
    return {
        "regions_float32": int(np.count_nonzero(table[1:].sum(axis=1))),
        "regions_bf16": int(np.count_nonzero(table[:, 1:].sum(axis=0))),
        "coverage_changed_pct": round(100.0 * float(np.mean((ref > 0) != (oth > 0))), 3),
        "pixels_moved_pct": round(100.0 * float(1.0 - table.max(axis=1).sum() / ref.size), 3),
    }


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, float, float, np.ndarray]:
    """(matmul GFLOP/s measured just before, wall seconds, process CPU seconds, result) of one call."""
    rate = matmul_gflops()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return rate, time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ovseg_core.backbones import load_backbone
    from ovseg_core.features.regions import SamRegionConfig, sam_regions

    model = load_backbone(args.backbone).model
    cfg = SamRegionConfig(**SETTINGS[args.setting])
    paths = sorted(VOC_JPEG.glob("*.jpg"))[: args.images]
    with_bf16 = not args.no_bf16
    runs_of = {
        "before": lambda img, c: library_regions(model, img, c),
        "after": lambda img, c: sam_regions(model, img, c).ids,
    }
    if with_bf16:
        runs_of["bf16"] = lambda img, c: sam_regions(model, img, c, compute_dtype=torch.bfloat16).ids
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    with torch.inference_mode():
        # bf16 runs the same operations as "after" (autocast changes dtypes, not ops); the FLOP
        # counter's dispatch mode does not compose with CPU autocast, so it is counted once in float32.
        flops = {name: count_flops(lambda: runs_of[name](images[0], cfg)) for name in ("before", "after")}
        flops["bf16"] = flops["after"]
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in runs_of}
        moves: list[dict] = []
        for image, path in zip(images, paths):
            outputs = {}
            for _ in range(args.repeats):
                for name, fn in runs_of.items():
                    rate, wall, cpu, out = timed(lambda: fn(image, cfg))
                    rows[name].append({"matmul_gflops": rate, "seconds": wall, "cpu_seconds": cpu,
                                       "share": flops["before"] / wall / 1e9 / rate,
                                       "own_share": flops[name] / wall / 1e9 / rate})
                    outputs[name] = out
            if not np.array_equal(outputs["before"], outputs["after"]):
                print(f"ERROR: the optimised map differs from the library's on {path.name}", file=sys.stderr)
                return 1
            if with_bf16:
                many = SamRegionConfig(**SETTINGS[MOVEMENT_SETTING])
                moves.append({"image": path.name, args.setting: movement(outputs["after"], outputs["bf16"]),
                              MOVEMENT_SETTING: movement(sam_regions(model, image, many).ids,
                                                         sam_regions(model, image, many, compute_dtype=torch.bfloat16).ids)})
    summary = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"gflops_per_image": flops[name] / 1e9}
        for name, rs in rows.items()
    }
    result = {"args": vars(args), "config": cfg.__dict__, "torch_threads": torch.get_num_threads(),
              "summary": summary, "runs": rows, "bf16_movement": moves, "identical_after_vs_before": True}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{args.backbone}, {len(paths)} VOC images x {args.repeats} repeats, {args.threads} threads, "
          f"setting {args.setting}; target share >= {TARGET_SHARE:.0%}\n")
    print("| path | s / image | CPU s / image | GFLOP / image | matmul GFLOP/s | % of matmul (own FLOPs) |")
    print("|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['seconds']:.2f} | {s['cpu_seconds']:.2f} | {s['gflops_per_image']:.0f} | "
              f"{s['matmul_gflops']:.0f} | {100 * s['share']:.0f} % ({100 * s['own_share']:.0f} %) |")
    for m in moves:
        print(f"bf16 vs float32, {m['image']}: " + "; ".join(f"{k} {v}" for k, v in m.items() if k != "image"))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
