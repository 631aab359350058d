"""``reconstruction``: a method's window features -> logits -> merged full-image prediction.

The method comes from the registry (``ovseg_core.methods``); its CLIP block outputs come from
``clip_layers`` (CLIP is not run again except for the last block each method applies with its
own weights), CorrCLIP's inputs from ``dino_features``, ``sam_masks``, ``mask_clustering`` and
``mask_class_tokens``. The image is not decoded: every input is cached, only the windows'
shape is needed. Windows of several images share one forward. Outputs are compact: the label
map ``(H, W) uint16`` and the winning probability ``(H, W) float16``. Item attrs: ``windows``,
``method`` and, for a method that records per-window choices (SC-CLIP's design-document
options), ``window_record``: ``{name: count over the image's windows}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovseg_core.backbones import num_blocks
from ovseg_core.methods import WindowInputs, get_method
from ovseg_core.postprocess import predict, window_logits
from ovseg_core.windows import accumulate_window_logits, finish_merge
from tasks.common import (
    region_windows,
    row_plan,
    run_windows,
    shape_only_crops,
)
from tasks.params import array_name
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]
_BLOCK = "block/"
_RECORD = "record/"


def reconstruction_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype).model.visual


def reconstruction_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    p = ctx.params
    method = get_method(p.method)
    plan = row_plan(p.window, row)
    cached = ctx.read_upstream("clip_layers", row)
    names = method.required_blocks(p.config, _num_blocks(ctx))
    win = {"crops": shape_only_crops(plan)}
    win.update({_BLOCK + n: torch.from_numpy(cached[array_name(n)]) for n in names})
    if method.uses_regions:
        win["qk"] = torch.from_numpy(ctx.read_upstream("dino_features", row, ["qk"])["qk"])
        win["regions"] = region_windows(ctx.read_upstream("sam_masks", row, ["ids"])["ids"], plan)
        win["merged"] = torch.from_numpy(ctx.read_upstream("mask_clustering", row, ["merged"])["merged"]).long()
        if method.semantic_branch(p.config):
            win["semantic"] = torch.from_numpy(ctx.read_upstream("mask_class_tokens", row, ["semantic"])["semantic"])
    return {"win": win, "plan": plan}


def _num_blocks(ctx: StageContext) -> int:
    return num_blocks(ctx.params.backbone)


def reconstruction_compute(ctx: StageContext, visual, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Label map and winning probability at original resolution for each image."""
    p = ctx.params
    method = get_method(p.method)
    text = ctx.read_shared("text_embeddings")
    emb = torch.from_numpy(text["embeddings"]).float().to(ctx.device)
    q2c = torch.from_numpy(text["query_to_class"]).long()
    canvases = [torch.zeros((emb.shape[0], *inp["plan"].resized_hw)) for inp in inputs]
    records: list[dict[str, int]] = [{} for _ in inputs]  # per image: the method's window record summed over windows

    def forward(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blocks = {k[len(_BLOCK):]: v.float() for k, v in b.items() if k.startswith(_BLOCK)}
        extra = WindowInputs(qk=b["qk"].float() if "qk" in b else None, regions=b.get("regions"),
                             merged=b.get("merged"), semantic=b["semantic"].float() if "semantic" in b else None,
                             text=emb, logit_scale=float(p.logit_scale))
        feats, record = method.features_and_record(visual, b["crops"], p.config, blocks, extra)
        logits = window_logits(feats.float(), emb, tuple(b["crops"].shape[-2:])).cpu()
        return {"logits": logits, **{_RECORD + k: v.cpu() for k, v in record.items()}}

    def sink(i: int, start: int, out: dict[str, torch.Tensor]) -> None:
        accumulate_window_logits(canvases[i], out["logits"], inputs[i]["plan"], start)
        for k, v in out.items():
            if k.startswith(_RECORD):
                records[i][k[len(_RECORD):]] = records[i].get(k[len(_RECORD):], 0) + int(v.long().sum())

    with torch.inference_mode():
        run_windows([i["win"] for i in inputs], forward, ctx.settings.window_batch, sink, ctx.device)
        out = []
        for canvas, inp, record in zip(canvases, inputs, records):
            labels, prob = predict(finish_merge(canvas, inp["plan"]), q2c, float(p.logit_scale), p.prob_thd, p.area_thd)
            dtype = np.uint16 if int(q2c.max()) < 65535 else np.int32
            attrs = {"windows": len(inp["plan"].windows), "method": p.method}
            if record:  # e.g. SC-CLIP's {"kept:self_adjusting": windows that kept the step, ...}
                attrs["window_record"] = dict(sorted(record.items()))
            out.append(({"labels": labels.numpy().astype(dtype), "prob": prob.numpy().astype(np.float16)}, attrs))
    return out
