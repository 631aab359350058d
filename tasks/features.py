"""Feature stages: ``text_embeddings``, ``sam_masks``, ``dino_features``, ``clip_layers``.

Each stage is ``models`` (loaded once per worker) -> ``load`` (one item's inputs: I/O only)
-> ``compute`` (pure ``ovseg_core`` calls over a group of items) -> arrays the executor writes.
``dino_features`` and ``clip_layers`` batch each image's windows (``window_batch`` per forward, one image per forward).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ovseg_core.features.clip import clip_block_outputs, normalize_clip
from ovseg_core.features.dino import (
    dino_input_from_clip,
    dino_qk_features,
    normalize_imagenet,
)
from ovseg_core.features.region_files import decode_label_map, regions_from_label_map
from ovseg_core.features.regions import region_map
from ovseg_core.features.text import TEMPLATE_SETS, text_embeddings
from ovseg_core.vocabulary import parse_class_lines
from tasks.common import decoded_rgb, embedded_windows, row_windows, run_windows, run_windows_at, to_store
from tasks.params import array_name
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]


# ----------------------------------------------------------------------------- text_embeddings
def text_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype)


def text_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def text_compute(ctx: StageContext, bb, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Prompt-ensembled query embeddings of the vocabulary (synonyms are separate queries)."""
    p = ctx.params
    vocab = parse_class_lines(list(p.classes), p.separator)
    if p.templates not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {p.templates!r}; valid: {sorted(TEMPLATE_SETS)}")
    with torch.inference_mode():
        emb = text_embeddings(bb.model, bb.tokenizer, vocab, TEMPLATE_SETS[p.templates])
    out = ({"embeddings": emb.float().cpu().numpy(), "query_to_class": vocab.query_to_class.astype(np.int64)},
           {"queries": list(vocab.queries), "class_names": list(vocab.class_names)})
    return [out for _ in inputs]


# ----------------------------------------------------------------------------- sam_masks
def sam_models(ctx: StageContext):
    p = ctx.params  # SAM networks load in float32; ``dtype`` is their autocast dtype
    return ctx.backbone(p.backbone).model if p.backbone is not None else None


def sam_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    if ctx.params.source == "files":
        stem = Path(row["abs_path"]).stem
        path = Path(ctx.node.inputs_dir or ".") / ctx.params.config.file_name(stem)
        if not path.is_file():
            raise FileNotFoundError(f"no region mask for image {stem!r}: {path} does not exist "
                                    "(check regions.params.dir and pattern)")
        return {"mask": path.read_bytes(), "hw": (int(row["height"]), int(row["width"]))}
    return {"image": decoded_rgb(ctx, row)}


def sam_compute(ctx: StageContext, model, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Region ids at original resolution (ascending-area painting, 0 = unsegmented), scores, areas."""
    out = []
    for inp in inputs:
        if "mask" in inp:
            rm = regions_from_label_map(decode_label_map(inp["mask"], ctx.params.config), inp["hw"])
        else:
            with torch.inference_mode():
                rm = region_map(model, inp["image"], ctx.params.config,
                                compute_dtype=getattr(torch, ctx.params.dtype or "float32"))
        out.append(({"ids": rm.ids, "scores": rm.scores, "areas": rm.areas}, {"num_regions": int(rm.scores.shape[0])}))
    return out


# ----------------------------------------------------------------------------- dino_features
def dino_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype).model


def dino_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    if ctx.params.input == "from_clip":  # the reference pads the CLIP-normalised crop, then converts it
        crops, plan = row_windows(ctx, row, ctx.params.window, normalize_clip)
        crops = dino_input_from_clip(crops)
    else:
        crops, plan = row_windows(ctx, row, ctx.params.window, normalize_imagenet)
    return {"win": {"crops": crops}, "plan": plan}


def windows_of(inp: Mapping[str, Any]) -> int:
    return len(inp["plan"].windows)


def dino_compute(ctx: StageContext, model, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Last-block q+k of every window, ``(n_win, hd, wd, C)``."""
    dtype = getattr(torch, ctx.params.dtype)
    parts: list[list[torch.Tensor]] = [[] for _ in inputs]
    with torch.inference_mode():
        run_windows([i["win"] for i in inputs],
                    lambda b: dino_qk_features(model, b["crops"].to(dtype), ctx.params.pos_interpolation).float().cpu(),
                    ctx.settings.window_batch, lambda i, start, x: parts[i].append(x), ctx.device)
    return [({"qk": to_store(torch.cat(p), ctx.params.feature_dtype)},
             {"windows": len(inp["plan"].windows), "resized_hw": list(inp["plan"].resized_hw)})
            for p, inp in zip(parts, inputs)]


# ----------------------------------------------------------------------------- clip_layers
def clip_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype).model.visual


def clip_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    crops, plan = row_windows(ctx, row, ctx.params.window, normalize_clip)
    return {"win": {"crops": crops}, "plan": plan, "image_id": str(row["image_id"])}


def clip_compute(ctx: StageContext, visual, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """The requested block aggregates of every window, each ``(n_win, 1 + N, D)``."""
    names = list(ctx.params.blocks)
    dtype = getattr(torch, ctx.params.dtype)
    parts: list[dict[str, list[torch.Tensor]]] = [{n: [] for n in names} for _ in inputs]

    def forward(i: int, start: int, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        crops = b["crops"].to(dtype)
        # in a fused chain the embedded windows stay in memory for mask_class_tokens (same model, windows, calls)
        tokens = embedded_windows(ctx, inputs[i]["image_id"], ctx.params.window, start, visual, crops)
        res = clip_block_outputs(visual, crops, names, tokens)
        return {n: res[n].float().cpu() for n in names}

    def sink(i: int, start: int, x: dict[str, torch.Tensor]) -> None:
        for n in names:
            parts[i][n].append(x[n])

    with torch.inference_mode():
        run_windows_at([i["win"] for i in inputs], forward, ctx.settings.window_batch, sink, ctx.device)
    return [({array_name(n): to_store(torch.cat(p[n]), ctx.params.feature_dtype) for n in names},
             {"windows": len(inp["plan"].windows), "resized_hw": list(inp["plan"].resized_hw), "blocks": names})
            for p, inp in zip(parts, inputs)]
