"""Memory-bank stages per image: ``bank_values`` (one node per CLIP) and ``bank_keys`` (CorrCLIPv2 VISR).

``bank_values``: the CorrCLIP output of every window with the authors' bank settings (DINO q+k
correlation from ``dino_features``, short side 448, crop 336 / stride 112, mask clustering off:
``flows.bank_graph``), bilinearly upsampled to the padded crop, summed over windows and divided
by the window count at the resized size, then ``ovseg_core.bank.pooling.pool_values`` (bilinear
resize to the original size without materialising it, mean per non-zero region id ascending,
L2-normalised, fp16). ``bank_keys``: ``pool_keys`` over the ``vfm_features`` token grid (the
per-pixel unit vectors averaged per region, fp16, not re-normalised). Both store the region's
mask id and area beside the rows (``docs/banks.md`` section 1; the registry assigns region ids).

Region maps come from ``sam_masks`` (0 = unsegmented, not a bank region): pre-generated mask
files are relabelled by that stage, so a file whose smallest id is a real segment loses it
(docs/banks.md, "Note for the wiring").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovseg_core.bank.config import PoolingConfig
from ovseg_core.bank.pooling import pool_keys, pool_values
from ovseg_core.methods import WindowInputs, get_method
from ovseg_core.windows import accumulate_window_logits, average_windows
from tasks.common import run_windows
from tasks.reconstruction import BLOCK, reconstruction_load
from tasks.runtime import StageContext

Output = tuple[dict[str, np.ndarray], dict[str, Any]]


def _pooled(pooled: Any, name: str) -> Output:
    return ({name: pooled.features, "mask_ids": pooled.mask_ids.astype(np.int64),
             "areas": pooled.areas.astype(np.int64)},
            {"regions": int(pooled.features.shape[0])})


# ----------------------------------------------------------------------------- bank_values
def values_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    """The reconstruction's window inputs of CorrCLIP v1 (``tasks.reconstruction.reconstruction_load``: plan,
    cached blocks, region windows, q+k, merged map, semantic tokens), and the region map to pool over."""
    return {**reconstruction_load(ctx, row), "ids": ctx.read_upstream("sam_masks", row, ["ids"])["ids"]}


def values_compute(ctx: StageContext, visual, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """``values (R, D) float16`` unit rows, ``mask_ids (R,)``, ``areas (R,)`` of each image."""
    p = ctx.params
    method = get_method(p.method)
    cdt = next(visual.parameters()).dtype
    canvases: list[torch.Tensor | None] = [None] * len(inputs)

    def forward(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blocks = {k[len(BLOCK):]: v.to(cdt) for k, v in b.items() if k.startswith(BLOCK)}
        extra = WindowInputs(qk=b["qk"].float(), regions=b["regions"], merged=b["merged"],
                             semantic=b["semantic"].to(cdt) if "semantic" in b else None)
        feats, _ = method.features_and_record(visual, b["crops"].to(cdt), p.config, blocks, extra)
        # (B, gh, gw, D) -> (B, D, Hp, Wp): the reference upsamples each window's output to the crop
        up = F.interpolate(feats.float().permute(0, 3, 1, 2), size=tuple(b["crops"].shape[-2:]), mode="bilinear",
                           align_corners=False)
        return {"feats": up.cpu()}

    def sink(i: int, start: int, out: dict[str, torch.Tensor]) -> None:
        if canvases[i] is None:
            canvases[i] = torch.zeros((out["feats"].shape[1], *inputs[i]["plan"].resized_hw), dtype=torch.float32)
        accumulate_window_logits(canvases[i], out["feats"], inputs[i]["plan"], start)

    cfg = PoolingConfig(empty_region=p.empty_region)
    with torch.inference_mode():
        run_windows([inp["win"] for inp in inputs], forward, ctx.settings.window_batch, sink, ctx.device)
        results = []
        for canvas, inp in zip(canvases, inputs):
            assert canvas is not None, "every image has at least one window"
            results.append(_pooled(pool_values(average_windows(canvas, inp["plan"]), inp["ids"], cfg), "values"))
    return results


# ----------------------------------------------------------------------------- bank_keys
def keys_load(ctx: StageContext, row: Mapping[str, Any]) -> dict[str, Any]:
    return {"vfm": torch.from_numpy(ctx.read_upstream("vfm_features", row, ["features"])["features"]),
            "ids": ctx.read_upstream("sam_masks", row, ["ids"])["ids"]}


def keys_compute(ctx: StageContext, _: None, inputs: Sequence[Mapping[str, Any]]) -> list[Output]:
    """``keys (R, C) float16`` (norm <= 1), ``mask_ids (R,)``, ``areas (R,)`` of each image."""
    cfg = PoolingConfig(empty_region=ctx.params.empty_region)
    return [_pooled(pool_keys(inp["vfm"].float(), inp["ids"], cfg), "keys") for inp in inputs]
