"""SC-CLIP per-window entry point: dense features of CLIP-normalised crops (the authors' forward).

Steps (methods.md section 3; ViT-B block numbers, 1-based):

1. anomaly detection on the patch tokens of block L-1 (11);
2. anomaly repair of those tokens (CLS split off; from here on x = patch tokens only);
3. mid-layer similarity Sim_mid = cos of block 9's patch tokens, repaired at the same positions;
4. self-adjusting, pre-adjust: x := W(Sim_mid) @ x;
5. attention enhancement, pass 1: the last block's self-adjusted attention on x;
6. self-adjusting, post-adjust: x := W'(cos of block 4's patch tokens) @ x;
7. multi-level fusion, pass 2: x := x + W' @ attention(sum of blocks 4..10);
8. output ln_post(x) @ proj on the CLIP token grid.

The block outputs it reads are named by :func:`required_blocks` (grammar of
:mod:`ovseg_core.features.clip`); passing them precomputed gives identical results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.features.clip import clip_block_outputs
from ovseg_core.scclip.anomaly_detection import detect_anomalies
from ovseg_core.scclip.anomaly_repair import repair_anomalies
from ovseg_core.scclip.config import SCCLIPConfig
from ovseg_core.scclip.multi_level_fusion import multi_level_fusion
from ovseg_core.scclip.self_adjusting import (
    aggregate,
    aggregation_weights,
    cosine_similarity,
    self_adjusted_attention,
)

__all__ = ["required_blocks", "resolve_block_inputs", "scclip_window_features"]


def required_blocks(cfg: SCCLIPConfig, num_blocks: int) -> tuple[str, ...]:
    """Names of the block outputs SC-CLIP reads, e.g. ``("block:4", "block:9", "block:11", "sum:4-10")``.

    Args:
        cfg: the configuration (``None`` fields are resolved for ``num_blocks``).
        num_blocks: L, the number of blocks of the CLIP tower.
    Returns:
        ``"block:i"`` names sorted by block, then the ``"sum:a-b"`` of the fusion (if on).
    """
    c = cfg.resolved(num_blocks)
    blocks = {num_blocks - 1}
    if c.self_adjusting or c.attention_enhancement:
        blocks.add(c.pre_adjust_block)  # type: ignore[arg-type]
    if c.self_adjusting:
        blocks.add(c.post_adjust_block)  # type: ignore[arg-type]
    names = [f"block:{i}" for i in sorted(blocks)]
    if c.multi_level_fusion:
        a, b = c.fusion_blocks  # type: ignore[misc]
        names.append(f"sum:{a}-{b}")
    return tuple(names)


def resolve_block_inputs(
    visual: nn.Module,
    crops: torch.Tensor,
    names: Sequence[str],
    blocks: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """The named block outputs of ``crops``: checked from ``blocks`` when given, else computed.

    Args:
        visual: the open_clip ``VisionTransformer``.
        crops: ``(B, 3, H, W)`` CLIP-normalised crops (only their shape is used when ``blocks`` is given).
        names: the required names (see :mod:`ovseg_core.features.clip`).
        blocks: cached ``{name: (B, 1 + gh*gw, D)}`` outputs of the same crops, or ``None``.
    Returns:
        ``{name: (B, 1 + N, D)}`` for every name, and the token grid ``(gh, gw)``.
    Raises:
        ValueError: a required name is missing or has the wrong shape.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be (B, 3, H, W) CLIP-normalised images, got {tuple(crops.shape)}")
    grid = clip_ops.token_grid(visual, crops.shape[-2], crops.shape[-1])
    if blocks is None:
        return clip_block_outputs(visual, crops, names), grid
    missing = [name for name in names if name not in blocks]
    if missing:
        raise ValueError(
            f"cached blocks lack {missing} (have {sorted(blocks)}); compute them with "
            f"clip_block_outputs(visual, crops, {list(names)})"
        )
    expected = (crops.shape[0], 1 + grid[0] * grid[1])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        t = blocks[name]
        if t.ndim != 3 or tuple(t.shape[:2]) != expected:
            raise ValueError(
                f"cached block {name!r} has shape {tuple(t.shape)}, expected (B, 1 + N, D) = {expected + ('D',)}"
            )
        out[name] = t
    return out, grid


@torch.no_grad()
def scclip_window_features(
    visual: nn.Module,
    crops: torch.Tensor,
    cfg: SCCLIPConfig,
    blocks: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SC-CLIP dense features of a batch of crops (no gradients).

    Args:
        visual: an open_clip ``VisionTransformer`` (OpenAI CLIP ViT-B/16 in the paper).
        crops: ``(B, 3, H, W) float32`` CLIP-normalised crops, sides multiples of the patch size.
        cfg: SC-CLIP configuration; ``None`` fields are resolved for the tower's depth.
        blocks: optional cached block outputs named by :func:`required_blocks` (float32).
    Returns:
        ``(B, gh, gw, E) float32`` features in the joint embedding space, not normalised.
    """
    num = clip_ops.num_blocks(visual)
    c = cfg.resolved(num)
    named, (gh, gw) = resolve_block_inputs(visual, crops, required_blocks(c, num), blocks)
    last_block = clip_ops.blocks_of(visual)[num - 1]
    penultimate = named[f"block:{num - 1}"].float()
    cls, x = penultimate[:, 0], penultimate[:, 1:]

    # anomaly detection and anomaly repair
    anomalies = detect_anomalies(x, c) if c.anomaly_repair else None
    if anomalies is not None:
        x = repair_anomalies(x, anomalies, (gh, gw))

    # self-adjusting: mid-layer similarity, pre-adjust aggregation
    mid_sim = None
    if c.self_adjusting or c.attention_enhancement:
        mid = named[f"block:{c.pre_adjust_block}"].float()[:, 1:]
        if anomalies is not None:
            mid = repair_anomalies(mid, anomalies, (gh, gw))
        mid_sim = cosine_similarity(mid)
    if c.self_adjusting:
        x = aggregate(x, aggregation_weights(mid_sim, c.sim_threshold, c.row_norm_eps))  # type: ignore[arg-type]

    # attention enhancement (pass 1)
    enhance_sim = mid_sim if c.attention_enhancement else None
    x = self_adjusted_attention(last_block, x, cls, enhance_sim, c.attn_scale, c.res_cls)  # type: ignore[arg-type]

    # self-adjusting: post-adjust aggregation
    post_weights = None
    if c.self_adjusting:
        post = named[f"block:{c.post_adjust_block}"].float()[:, 1:]
        post_weights = aggregation_weights(cosine_similarity(post), c.sim_threshold, c.row_norm_eps)
        x = aggregate(x, post_weights)

    # multi-level fusion (pass 2)
    if c.multi_level_fusion:
        a, b = c.fusion_blocks  # type: ignore[misc]
        level_sum = named[f"sum:{a}-{b}"].float()
        x = multi_level_fusion(
            x, level_sum, last_block, enhance_sim, post_weights, c.attn_scale, c.res_cls  # type: ignore[arg-type]
        )

    # output: ln_post(x) @ proj on the CLIP token grid
    feats = clip_ops.project(visual, x)
    return feats.reshape(feats.shape[0], gh, gw, feats.shape[-1]).float()
