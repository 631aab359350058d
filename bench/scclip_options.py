"""SC-CLIP's design-document options: seconds per image and pixel agreement with the paper's path.

Usage (from the repository root, the venv's Python)::

    python bench/scclip_options.py [--backbone clip:ViT-B-16@random:0] [--images 4] [--repeats 3] [--threads 2]

For every option of :data:`OPTIONS` on the first N images of the embedded VOC sample, with the
SC-CLIP VOC21 preset (short side 336, crop 224, stride 112, logit scale 50, prob_thd 0.15,
area_thd 0.1) and the SC-CLIP VOC21 class file:

- **seconds per image**: the reconstruction stage's computation (the method's window features
  through ``Method.features_and_record``, ``window_logits``, the window merge and ``predict``:
  the ``ovseg_core`` calls ``tasks/reconstruction.py`` makes, without store or Prefect), all
  windows of an image in one batch, and within it the window features alone (wall and process
  CPU seconds: the part the options change; CPU seconds are less sensitive to other processes).
  The CLIP block outputs are computed once per image, untimed: they are the cached
  ``clip_layers`` stage, shared by every option. Every option runs once untimed first; then each
  repeat runs every option once per image, in an order rotated from image to image (a shared
  machine's load spreads over all of them). Per image the median over repeats, then the mean
  over images; ratios are to the paper path's figure of the same kind.
- **agreement**: share of the pixels (all images pooled) whose label equals the paper path's:
  the preset's labels (background threshold and area filter applied: what the pipeline
  outputs) and the plain class argmax (neither applied). A random network's probabilities are
  nearly uniform, so the preset turns almost every pixel into background and its agreement says
  little; the argmax agreement shows how far an option moves the class scores. Deterministic,
  computed in the untimed pass.
- **record**: what the option decided, pooled over the windows (steps kept by the gate, paths).

The weights are random (``@random``): agreement says how much an option moves the prediction
of *this* network, not whether it helps. Accuracy needs pretrained weights and a scored run
(README, "SC-CLIP's design-document options"). Text embeddings use the single template
(``a photo of a {}.``) to keep the set-up cheap; that does not change the timed work.

Writes JSON to ``--out`` (default ``bench/out/scclip_options.json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ovseg_core.backbones import load_backbone, num_blocks
from ovseg_core.datasets import CLASS_SEPARATORS, class_lines, get_dataset
from ovseg_core.features.clip import clip_block_outputs, normalize_clip
from ovseg_core.features.text import TEMPLATE_SETS, parse_class_lines, text_embeddings
from ovseg_core.methods import WindowInputs, get_method
from ovseg_core.postprocess import predict, window_logits
from ovseg_core.windows import crop_windows, merge_window_logits, plan_windows, resize_image

REPO = Path(__file__).resolve().parents[1]
VOC_JPEG = REPO / "examples" / "data" / "voc2012-sample" / "VOCdevkit" / "VOC2012" / "JPEGImages"
DEFAULT_OUT = REPO / "bench" / "out" / "scclip_options.json"
PAPER = "paper (default)"
OPTIONS: dict[str, dict[str, Any]] = {
    PAPER: {},
    "dynamic_detection": {"dynamic_detection": True},
    "boundary_aware_repair": {"boundary_aware_repair": True},
    "dynamic + boundary-aware": {"dynamic_detection": True, "boundary_aware_repair": True},
    "progressive_calibration": {"progressive_calibration": True},
    "progressive, skip < 0.5": {"progressive_calibration": True, "gate_skip_complexity": 0.5},
    "selective_calibration": {"selective_calibration": True},
    "selective, force fast": {"selective_calibration": True, "selective_force": "fast"},
    "selective, force balanced": {"selective_calibration": True, "selective_force": "balanced"},
    "selective, force full": {"selective_calibration": True, "selective_force": "full"},
}
"""Bench rows: a name and the SC-CLIP params (experiment-file ``params``) it sets."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="clip:ViT-B-16@random:0",
                   help="CLIP backbone (default clip:ViT-B-16@random:0; clip:tiny@random:0 for a smoke test)")
    p.add_argument("--images", type=int, default=4, help="VOC sample images, first N by name (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--only", nargs="*", choices=tuple(OPTIONS), help="rows to run (the paper's row always runs)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output file")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--images, --repeats and --threads must be >= 1")
    return args


def summarise_record(record: Mapping[str, int], windows: int) -> str:
    """A record summed over windows: window counts as ``kept:self_adjusting 3/8``, ``anomalies`` per window."""
    parts = [f"anomalies {v / windows:.1f}/window" if k == "anomalies" else f"{k} {v}/{windows}"
             for k, v in sorted(record.items())]
    return ", ".join(parts) or "-"


def agreement(labels: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Share of pixels, pooled over images, whose label equals the reference's."""
    same = sum(int((a == b).sum()) for a, b in zip(labels, reference))
    total = sum(b.size for b in reference)
    return same / total


def _images(n: int) -> list[torch.Tensor]:
    paths = sorted(VOC_JPEG.glob("*.jpg"))[:n]
    if not paths:
        raise SystemExit(f"no sample images in {VOC_JPEG}")
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) for p in paths]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = get_dataset("VOC21")
    preset = spec.presets["scclip"]
    clip = load_backbone(args.backbone)
    visual = clip.model.visual
    depth = num_blocks(args.backbone)
    vocab = parse_class_lines(class_lines("VOC21", "scclip"), CLASS_SEPARATORS["scclip"])
    with torch.no_grad():
        text = text_embeddings(clip.model, clip.tokenizer, vocab, TEMPLATE_SETS["single"]).float()
    q2c = torch.as_tensor(vocab.query_to_class, dtype=torch.int64)
    method = get_method("scclip")
    names = [PAPER] + [n for n in OPTIONS if n != PAPER and (not args.only or n in args.only)]
    configs = {n: method.build(OPTIONS[n], depth) for n in names}
    needed = sorted({b for c in configs.values() for b in method.required_blocks(c, depth)})

    # untimed: windows and the cached CLIP block outputs of every image
    images = []
    for img in _images(args.images):
        plan = plan_windows((img.shape[1], img.shape[2]), preset.short_side, preset.crop, preset.stride, 16)
        crops = crop_windows(normalize_clip(resize_image(img, plan.resized_hw)[None])[0], plan)
        with torch.no_grad():
            images.append((plan, crops, clip_block_outputs(visual, crops, needed)))
    inputs = WindowInputs(text=text, logit_scale=preset.logit_scale)

    def reconstruct(cfg: Any, plan, crops, blocks, clock: dict[str, float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """One image's labels (the preset's and the plain argmax) and record; adds the window features' seconds to ``clock``."""
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            feats, record = method.features_and_record(visual, crops, cfg, blocks, inputs)
            if clock is not None:
                clock["features"] += time.perf_counter() - t0
                clock["features_cpu"] += time.process_time() - c0
            logits = merge_window_logits(window_logits(feats.float(), text, tuple(crops.shape[-2:])), plan)
            labels, _ = predict(logits, q2c, preset.logit_scale, preset.prob_thd, preset.area_thd)
            argmax = None if clock is not None else predict(logits, q2c, preset.logit_scale, None, None)[0].numpy()
        return labels.numpy(), argmax, {k: int(v.long().sum()) for k, v in record.items()}

    # warm-up (untimed): every option once on every image; the labels and records come from this pass
    labels: dict[str, list[np.ndarray]] = {}
    argmax: dict[str, list[np.ndarray]] = {}
    records: dict[str, dict[str, int]] = {}
    for name in names:
        outs = [reconstruct(configs[name], *im) for im in images]
        labels[name] = [o[0] for o in outs]
        argmax[name] = [o[1] for o in outs]
        records[name] = {}
        for _, _, rec in outs:
            for k, v in rec.items():
                records[name][k] = records[name].get(k, 0) + v
    # timed: options interleaved image by image, so that the load of a shared machine spreads over all of them
    # timed: per repeat and image every option once, in an order rotated from one (repeat, image) to the next
    clocks = ("total", "features", "features_cpu")
    samples = {n: {k: [[] for _ in images] for k in clocks} for n in names}  # [option][clock][image] -> seconds
    turn = 0
    for rep in range(args.repeats):
        for i, im in enumerate(images):
            for name in names[turn % len(names):] + names[:turn % len(names)]:
                clock = dict.fromkeys(clocks, 0.0)
                t0 = time.perf_counter()
                reconstruct(configs[name], *im, clock=clock)
                clock["total"] = time.perf_counter() - t0
                for k in clocks:
                    samples[name][k][i].append(clock[k])
            turn += 1
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    # per image the median over repeats, then the mean over images
    per_image = {n: {k: statistics.fmean(statistics.median(v) for v in samples[n][k]) for k in clocks} for n in names}

    windows = sum(len(im[0].windows) for im in images)
    rows = []
    for name in names:
        rows.append({
            "option": name,
            "params": OPTIONS[name],
            **{f"{k}_seconds_per_image": per_image[name][k] for k in clocks},
            **{f"{k}_ratio_to_paper": per_image[name][k] / per_image[PAPER][k] for k in clocks},
            "pixel_agreement": agreement(labels[name], labels[PAPER]),
            "argmax_agreement": agreement(argmax[name], argmax[PAPER]),
            "record": records[name],
        })
    result = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + list(argv if argv is not None else sys.argv[1:])),
        "backbone": args.backbone, "random_weights": "@random" in args.backbone or "tiny" in args.backbone,
        "images": len(images), "windows": windows, "repeats": args.repeats, "threads": args.threads,
        "load_average_1min": os.getloadavg()[0],
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return result


def markdown(result: Mapping[str, Any]) -> str:
    """The result as a Markdown table (one row per option)."""
    lines = [
        f"SC-CLIP options, {result['backbone']} (random weights: agreement is not accuracy), {result['images']} VOC "
        f"sample images ({result['windows']} windows), per-image medians of {result['repeats']} repeats, {result['threads']} threads, "
        f"load average {result['load_average_1min']:.1f} at the end",
        "",
        "| option | window features s / image | vs paper | (CPU s) | vs paper | reconstruction s / image | vs paper "
        "| pixel agreement | argmax agreement | record (of the windows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['option']} | {r['features_seconds_per_image']:.3f} | {r['features_ratio_to_paper']:.2f}x | "
            f"{r['features_cpu_seconds_per_image']:.3f} | {r['features_cpu_ratio_to_paper']:.2f}x | "
            f"{r['total_seconds_per_image']:.3f} | {r['total_ratio_to_paper']:.2f}x | "
            f"{100 * r['pixel_agreement']:.1f} % | {100 * r['argmax_agreement']:.1f} % | "
            f"{summarise_record(r['record'], result['windows'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
