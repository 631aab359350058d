"""``reconstruction``: a method's window features -> logits -> merged full-image prediction.

The method comes from the registry (``ovseg_core.methods``); its CLIP block outputs come from
``clip_layers`` (CLIP is not run again except for the last block each method applies with its
own weights), CorrCLIP's inputs from ``dino_features``, ``sam_masks``, ``mask_clustering`` and
``mask_class_tokens``; CorrCLIPv2's (``Method.correlation == "vfm"``) from ``vfm_features``,
``sam_masks`` and ``mask_class_tokens``: each window's correlation features are made from the
image's VFM map inside the forward (``vfm_window_features``, only for the windows of the batch),
and the regions are relabelled there (``merged`` is not an input: no DBSCAN, or with
``mask_clustering: true`` DBSCAN on the VFM features). The image is not decoded (every input is
cached, only the windows' shape is needed), except for CorrCLIPv2 with DBSCAN and the semantic
branch, whose mask class tokens are computed here from the windows. A forward holds the windows
of one image (``tasks.common.run_windows``). Outputs are compact: the label map ``(H, W) uint16`` and the winning
probability ``(H, W) float16``. Item attrs: ``windows``, ``method`` and, for a method that records
per-window choices (SC-CLIP's design-document options), ``window_record``: ``{name: count over
the image's windows}``.

Precision: window logits are summed into a float32 canvas; CorrCLIPv2 with ``dtype: float16``
sums them into a float16 canvas and averages, resizes and softmaxes in float16 (the reference's
half ``preds`` / ``count_mat``), and computes its correlation features in float16.

Memory-bank hook (CorrCLIPv2's VISR, ``corrclipv2.md`` section 3 step 7): ``_finish`` receives the
window-averaged cosine logits ``(Q, h, w)`` at the network-input size, before the resize to the
original size, the logit scale, the softmax and the thresholds: with ``ReconstructionParams.bank``
they are first fused ``alpha * own + (1 - alpha) * support`` (``tasks.bank_index.fuse_with_bank``, the
regions of the whole batch retrieved in one search call by ``retrieve_batch``;
item attrs ``bank``: its name, the regions queried and those without any retrieved neighbour, which
keep their own logits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ovseg_core.backbones import num_blocks, patch_size
from ovseg_core.corrclip.vfm_correlation import vfm_window_features
from ovseg_core.features.clip import normalize_clip
from ovseg_core.methods import WindowInputs, get_method
from ovseg_core.postprocess import predict, window_logits
from ovseg_core.windows import WindowPlan, accumulate_window_logits, average_windows, to_original_size
from tasks.bank_index import fuse_with_bank, retrieve_batch
from tasks.bank_params import BANK_ITEM
from tasks.common import row_plan, row_region_windows, row_windows, run_windows, shape_only_crops
from tasks.params import array_name
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]
BLOCK = "block/"  # window-input prefix of a cached CLIP block's output (also read by tasks.bank)
_RECORD = "record/"
_WINDOW = "window"  # per-window index (CorrCLIPv2: which window's correlation features to make)
_AT = "at"  # per-window (image, window) index in a forward's batch


def reconstruction_models(ctx: StageContext):
    return ctx.backbone(ctx.params.backbone, ctx.params.dtype).model.visual


def reconstruction_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    p = ctx.params
    method = get_method(p.method)
    plan = row_plan(p.window, row)
    cached = ctx.read_upstream("clip_layers", row)
    names = method.required_blocks(p.config, _num_blocks(ctx))
    win = {"crops": shape_only_crops(plan)}
    win.update({BLOCK + n: torch.from_numpy(cached[array_name(n)]) for n in names})
    out: dict[str, Any] = {"win": win, "plan": plan}
    if method.uses_regions:
        win["regions"] = row_region_windows(ctx, row, "sam_masks", plan)
        if method.correlation == "vfm":  # the image's map; each window's features are made in the forward
            out["vfm"] = torch.from_numpy(ctx.read_upstream("vfm_features", row, ["features"])["features"])
            if p.bank is not None:  # CorrCLIPv2's memory bank: the region map is also the retrieval's
                out["region_ids"] = ctx.read_upstream("sam_masks", row, ["ids"])["ids"]
            win[_WINDOW] = torch.arange(len(plan.windows))
        else:
            win["qk"] = torch.from_numpy(ctx.read_upstream("dino_features", row, ["qk"])["qk"])
            win["merged"] = torch.from_numpy(ctx.read_upstream("mask_clustering", row, ["merged"])["merged"]).long()
        if method.semantic_stage(p.config):
            win["semantic"] = torch.from_numpy(ctx.read_upstream("mask_class_tokens", row, ["semantic"])["semantic"])
        elif method.semantic_branch(p.config):  # CorrCLIPv2 with DBSCAN: its tokens pool over the clustered map
            win["crops"], _ = row_windows(ctx, row, p.window, normalize_clip)
    return out


def _num_blocks(ctx: StageContext) -> int:
    return num_blocks(ctx.params.backbone)


def reconstruction_compute(ctx: StageContext, visual, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """Label map and winning probability at original resolution for each image."""
    p = ctx.params
    method = get_method(p.method)
    text = ctx.read_shared("text_embeddings")
    emb = torch.from_numpy(text["embeddings"]).float().to(ctx.device)
    q2c = torch.from_numpy(text["query_to_class"]).long()
    bank = ctx.read_shared("bank_index", BANK_ITEM) if p.bank is not None else None  # the index, once per worker
    aux_text = (torch.from_numpy(ctx.read_shared("aux_text_embeddings")["embeddings"]).float()
                if bank is not None and "aux_text_embeddings" in ctx.node.upstream else None)
    half = method.correlation == "vfm" and p.dtype == "float16"  # CorrCLIPv2's reference merges in fp16
    canvases = [torch.zeros((emb.shape[0], *inp["plan"].resized_hw), dtype=torch.float16 if half else torch.float32)
                for inp in inputs]
    records: list[dict[str, int]] = [{} for _ in inputs]  # per image: the method's window record summed over windows
    maps = [inp["vfm"].to(ctx.device) if "vfm" in inp else None for inp in inputs]
    corr_dtype = torch.float16 if half else torch.float32
    patch = patch_size(p.backbone)

    cdt = next(visual.parameters()).dtype  # stored features enter the forward at the CLIP's dtype (run ``dtype``)

    def forward(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blocks = {k[len(BLOCK):]: v.to(cdt) for k, v in b.items() if k.startswith(BLOCK)}
        vfm = _vfm_windows(b[_AT], maps, [inp["plan"] for inp in inputs], patch, corr_dtype) if _AT in b else None
        extra = WindowInputs(qk=b["qk"].float() if "qk" in b else None, regions=b.get("regions"),
                             merged=b.get("merged"), semantic=b["semantic"].to(cdt) if "semantic" in b else None,
                             vfm=vfm, text=emb, logit_scale=float(p.logit_scale))
        feats, record = method.features_and_record(visual, b["crops"].to(cdt), p.config, blocks, extra)
        logits = window_logits(feats.float(), emb, tuple(b["crops"].shape[-2:])).cpu()
        return {"logits": logits, **{_RECORD + k: v.cpu() for k, v in record.items()}}

    def sink(i: int, start: int, out: dict[str, torch.Tensor]) -> None:
        accumulate_window_logits(canvases[i], out["logits"], inputs[i]["plan"], start)
        for k, v in out.items():
            if k.startswith(_RECORD):
                records[i][k[len(_RECORD):]] = records[i].get(k[len(_RECORD):], 0) + int(v.long().sum())

    with torch.inference_mode():
        run_windows([_indexed(i, inp["win"]) for i, inp in enumerate(inputs)], forward, ctx.settings.window_batch,
                    sink, ctx.device)
        out = []
        # VISR's retrieval: the regions of every image of the batch in one search call
        retrieved = (retrieve_batch(ctx, bank, [(inp["plan"].resized_hw, inp["region_ids"], inp["vfm"]) for inp in inputs])
                     if bank is not None else [None] * len(inputs))
        for canvas, inp, record, got in zip(canvases, inputs, records, retrieved):
            averaged = average_windows(canvas, inp["plan"])
            attrs = {"windows": len(inp["plan"].windows), "method": p.method}
            if got is not None:  # VISR (+ DMCE) before the resize: facts section 3 step 7
                averaged, support = fuse_with_bank(ctx, bank, averaged, got, emb, aux_text)
                attrs["bank"] = {"name": p.bank.bank, "regions": int(support.found.size),
                                 "without_support": int((~support.found).sum())}
            labels, prob = _finish(averaged, inp["plan"], q2c, p)
            dtype = np.uint16 if int(q2c.max()) < 65535 else np.int32
            if record:  # e.g. SC-CLIP's {"kept:self_adjusting": windows that kept the step, ...}
                attrs["window_record"] = dict(sorted(record.items()))
            out.append(({"labels": labels.numpy().astype(dtype), "prob": prob.numpy().astype(np.float16)}, attrs))
    return out


def _finish(averaged: torch.Tensor, plan: WindowPlan, q2c: torch.Tensor, p: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and winning probability at original size from the window-averaged cosine logits.

    ``averaged``: ``(Q, h, w)`` at the network-input size, in the canvas dtype: the point where
    CorrCLIPv2's memory-bank fusion applies (before the resize; facts section 3 step 7).
    """
    return predict(to_original_size(averaged, plan), q2c, float(p.logit_scale), p.prob_thd, p.area_thd)


def _indexed(i: int, win: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image's per-window inputs, with CorrCLIPv2's window index turned into ``(image, window)`` pairs."""
    if _WINDOW not in win:
        return win
    out = {k: v for k, v in win.items() if k != _WINDOW}
    out[_AT] = torch.stack([torch.full_like(win[_WINDOW], i), win[_WINDOW]], dim=1)
    return out


def _vfm_windows(at: torch.Tensor, maps: list[torch.Tensor | None], plans: list[WindowPlan], clip_patch: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """CorrCLIPv2's correlation features ``(B, hc, wc, C) float32`` of a batch's windows, from their images' maps.

    ``at``: ``(B, 2)`` (image, window) pairs in batch order; consecutive windows of one image are made in one
    ``vfm_window_features`` call, in ``dtype`` (float16: the reference's half precision).
    """
    runs: list[list[int]] = []  # [image, first window, stop]
    for i, w in at.tolist():
        if runs and runs[-1][0] == i and runs[-1][2] == w:
            runs[-1][2] = w + 1
        else:
            runs.append([i, w, w + 1])
    parts = []
    for i, start, stop in runs:
        vfm_map = maps[i]
        if vfm_map is None:
            raise ValueError("a window asks for VFM features but its image has no vfm_features input")
        parts.append(vfm_window_features(vfm_map.float(), plans[i], clip_patch, start, stop, dtype=dtype))
    return torch.cat(parts).float()
