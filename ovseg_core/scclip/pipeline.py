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

The design document's extensions (off by default; docs/methods.md section 7) replace steps 1-2
(:mod:`.dynamic_anomaly_detection`, :mod:`.boundary_aware_repair`) or switch the calibration
steps per window (:mod:`.progressive_calibration`, :mod:`.selective_calibration`); with every
option off the computation is the paper's, operation for operation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ovseg_core import clip_ops
from ovseg_core.features.clip import clip_block_outputs
from ovseg_core.scclip.anomaly_detection import detect_anomalies, lof_scores, lof_variant
from ovseg_core.scclip.anomaly_repair import repair_anomalies
from ovseg_core.scclip.boundary_aware_repair import boundary_aware_repair
from ovseg_core.scclip.config import CALIBRATION_STEPS, SELECTIVE_PATHS, SCCLIPConfig
from ovseg_core.scclip.dynamic_anomaly_detection import complexity, detect_dynamic_anomalies
from ovseg_core.scclip.multi_level_fusion import multi_level_fusion
from ovseg_core.scclip.progressive_calibration import progressive_calibration, quality_score
from ovseg_core.scclip.selective_calibration import allowed_steps, calibration_need, choose_paths
from ovseg_core.scclip.self_adjusting import (
    aggregate,
    aggregation_weights,
    cosine_similarity,
    self_adjusted_attention,
)

__all__ = ["Switches", "required_blocks", "resolve_block_inputs", "scclip_window_features", "scclip_window_outputs"]

Switches = Mapping[str, "torch.Tensor | None"]
"""Calibration steps per window: ``{step: None}`` = on in every window, ``{step: (B,) bool}`` = on
in those windows; a step not in the mapping is off."""


def _reads_mid_layer(c: SCCLIPConfig) -> bool:
    """Whether the pre-adjust block's tokens are read (Sim_mid, or an extension's mid-layer similarity)."""
    return (c.self_adjusting or c.attention_enhancement or c.dynamic_detection or c.boundary_aware_repair
            or c.progressive_calibration)


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
    if _reads_mid_layer(c):
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


@dataclass(frozen=True)
class _Window:
    """A batch of windows' inputs to the calibration steps (after anomaly detection)."""

    visual: nn.Module  # the vision tower (ln_post, proj)
    block: nn.Module  # its last block
    cls: torch.Tensor  # (B, D) CLS token of the penultimate output
    x: torch.Tensor  # (B, N, D) penultimate patch tokens
    mid: torch.Tensor | None  # (B, N, Dm) pre-adjust block patch tokens (before repair)
    post: torch.Tensor | None  # (B, N, Dp) post-adjust block patch tokens
    level_sum: torch.Tensor | None  # (B, 1 + N, D) sum of the fusion blocks' outputs
    anomalies: torch.Tensor | None  # (B, N) bool; None when anomaly repair is off
    repair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, anomalies) -> repaired tokens


def _where(windows: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` in ``windows`` (``(B,) bool``; ``None`` = every window: ``new`` itself), ``old`` elsewhere."""
    if windows is None:
        return new
    return torch.where(windows.reshape(-1, *([1] * (new.ndim - 1))), new, old)


def _subset(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def _calibrate(w: _Window, c: SCCLIPConfig, on: Switches) -> torch.Tensor:
    """SC-CLIP steps 2-8 with the calibration steps of ``on``; ``(B, N, E)`` features.

    With ``on = {step: None for every configured step}`` this is the paper's computation.
    """
    x, mid = w.x, w.mid
    # anomaly repair
    if "anomaly_repair" in on and w.anomalies is not None:
        windows = on["anomaly_repair"]
        anomalies = w.anomalies if windows is None else w.anomalies & windows[:, None]
        x = w.repair(x, anomalies)
        if mid is not None:
            mid = w.repair(mid, anomalies)

    # self-adjusting: mid-layer similarity, pre-adjust aggregation
    mid_sim = None
    if "self_adjusting" in on or "attention_enhancement" in on:
        mid_sim = cosine_similarity(mid)  # type: ignore[arg-type]
    adjust = on.get("self_adjusting")
    if "self_adjusting" in on:
        pre_weights = aggregation_weights(mid_sim, c.sim_threshold, c.row_norm_eps)  # type: ignore[arg-type]
        x = _where(adjust, aggregate(x, pre_weights), x)

    # attention enhancement (pass 1)
    enhance_sim = mid_sim if "attention_enhancement" in on else None
    enhance = on.get("attention_enhancement")
    x = self_adjusted_attention(w.block, x, w.cls, enhance_sim, c.attn_scale, c.res_cls, enhance)  # type: ignore[arg-type]

    # self-adjusting: post-adjust aggregation
    post_weights = None
    if "self_adjusting" in on:
        post_weights = aggregation_weights(cosine_similarity(w.post), c.sim_threshold, c.row_norm_eps)  # type: ignore[arg-type]
        x = _where(adjust, aggregate(x, post_weights), x)

    # multi-level fusion (pass 2), computed only for the windows that take it
    if "multi_level_fusion" in on:
        fuse = on["multi_level_fusion"]
        if fuse is None:
            x = multi_level_fusion(x, w.level_sum, w.block, enhance_sim, post_weights,  # type: ignore[arg-type]
                                   c.attn_scale, c.res_cls, enhance, adjust)  # type: ignore[arg-type]
        else:
            idx = fuse.nonzero().flatten()
            x = x.clone()
            x[idx] = multi_level_fusion(
                x[idx], w.level_sum[idx], w.block, _subset(enhance_sim, idx), _subset(post_weights, idx),  # type: ignore[index]
                c.attn_scale, c.res_cls, _subset(enhance, idx), _subset(adjust, idx),  # type: ignore[arg-type]
            )

    # output: ln_post(x) @ proj on the CLIP token grid
    return clip_ops.project(w.visual, x)


def _repair_function(
    c: SCCLIPConfig, grid: tuple[int, int], mid: torch.Tensor | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(tokens, anomalies) -> repaired tokens``: the paper's repair, or boundary-aware repair."""
    if not c.boundary_aware_repair:
        return lambda t, a: repair_anomalies(t, a, grid)
    raw_mid_sim = cosine_similarity(mid)  # type: ignore[arg-type]  # sides come from the similarity before repair
    return lambda t, a: boundary_aware_repair(t, a, grid, raw_mid_sim, c.boundary_gap)


def _switches(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Per-window masks as :data:`Switches`: a step on nowhere is dropped, one on everywhere becomes ``None``."""
    return {step: None if bool(m.all()) else m for step, m in masks.items() if bool(m.any())}


@torch.no_grad()
def scclip_window_outputs(
    visual: nn.Module,
    crops: torch.Tensor,
    cfg: SCCLIPConfig,
    blocks: Mapping[str, torch.Tensor] | None = None,
    text: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SC-CLIP dense features of a batch of crops and a per-window record of the extensions' choices.

    Args:
        visual: an open_clip ``VisionTransformer`` (OpenAI CLIP ViT-B/16 in the paper).
        crops: ``(B, 3, H, W) float32`` CLIP-normalised crops, sides multiples of the patch size.
        cfg: SC-CLIP configuration; ``None`` fields are resolved for the tower's depth.
        blocks: optional cached block outputs named by :func:`required_blocks` (float32).
        text: ``(Q, E)`` L2-normalised query embeddings; read by ``progressive_calibration`` only.
        logit_scale: the prediction's softmax scale; read by ``progressive_calibration`` only.
    Returns:
        ``(B, gh, gw, E) float32`` features in the joint embedding space, not normalised, and
        ``{name: (B,) tensor}``: ``"anomalies"`` (int64 count; ``dynamic_detection``),
        ``"path:fast"``, ``"path:balanced"``, ``"path:full"`` (bool; ``selective_calibration``),
        ``"kept:<step>"`` for every configured step (bool; ``progressive_calibration``) and
        ``"complexity_skip"`` (bool; ``gate_skip_complexity > 0``). Empty with every extension off.
    """
    num = clip_ops.num_blocks(visual)
    c = cfg.resolved(num)
    named, (gh, gw) = resolve_block_inputs(visual, crops, required_blocks(c, num), blocks)
    penultimate = named[f"block:{num - 1}"].float()
    cls, x = penultimate[:, 0], penultimate[:, 1:]
    mid = named[f"block:{c.pre_adjust_block}"].float()[:, 1:] if _reads_mid_layer(c) else None
    record: dict[str, torch.Tensor] = {}

    # selective calibration's need predictor reads the LOF scores of the penultimate tokens
    lof = None
    if c.selective_calibration and c.selective_force is None:
        lof = lof_scores(x, c.n_neighbors, variant=lof_variant(c.detector), eps=c.lof_eps)

    # anomaly detection: the paper's, or dynamic
    anomalies = None
    if c.anomaly_repair and c.dynamic_detection:
        anomalies, _ = detect_dynamic_anomalies(x, mid, (gh, gw), c)  # type: ignore[arg-type]
        record["anomalies"] = anomalies.sum(dim=-1)
    elif c.anomaly_repair:
        anomalies = detect_anomalies(x, c, lof=lof)

    first, last = c.fusion_blocks  # type: ignore[misc]
    window = _Window(
        visual=visual,
        block=clip_ops.blocks_of(visual)[num - 1],
        cls=cls,
        x=x,
        mid=mid,
        post=named[f"block:{c.post_adjust_block}"].float()[:, 1:] if c.self_adjusting else None,
        level_sum=named[f"sum:{first}-{last}"].float() if c.multi_level_fusion else None,
        anomalies=anomalies,
        repair=_repair_function(c, (gh, gw), mid),
    )
    steps = tuple(s for s in CALIBRATION_STEPS if getattr(c, s))
    if c.selective_calibration or c.progressive_calibration:
        feats = _switched_calibration(window, c, steps, lof, (gh, gw), text, logit_scale, record)
    else:
        feats = _calibrate(window, c, {s: None for s in steps})
    return feats.reshape(feats.shape[0], gh, gw, feats.shape[-1]).float(), record


def _switched_calibration(
    w: _Window,
    c: SCCLIPConfig,
    steps: tuple[str, ...],
    lof: torch.Tensor | None,
    grid: tuple[int, int],
    text: torch.Tensor | None,
    logit_scale: float | None,
    record: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Selective and/or progressive calibration: the configured ``steps`` switched per window; fills ``record``."""
    b = w.x.shape[0]
    allowed = {s: torch.ones(b, dtype=torch.bool, device=w.x.device) for s in steps}
    # selective calibration: the path of each window
    if c.selective_calibration:
        if c.selective_force is not None:
            paths = torch.full((b,), SELECTIVE_PATHS.index(c.selective_force), dtype=torch.int64, device=w.x.device)
        else:
            paths = choose_paths(calibration_need(lof), c.selective_fast_below, c.selective_full_from)  # type: ignore[arg-type]
        record.update({f"path:{p}": paths == i for i, p in enumerate(SELECTIVE_PATHS)})
        allowed = allowed_steps(paths, steps)
    if not c.progressive_calibration:
        return _calibrate(w, c, _switches(allowed))

    # progressive calibration: the complexity skip, then the quality gate step by step
    if text is None or logit_scale is None:
        raise ValueError(
            "SCCLIPConfig.progressive_calibration scores the predictions: pass the vocabulary's text embeddings and "
            "the logit scale (scclip_window_outputs(..., text=, logit_scale=) or WindowInputs(text=, logit_scale=))"
        )
    if c.gate_skip_complexity > 0:
        simple = complexity(w.x, grid, c.complexity_sim_threshold) < c.gate_skip_complexity
        record["complexity_skip"] = simple
        later = CALIBRATION_STEPS[CALIBRATION_STEPS.index(c.gate_skip_from):]
        allowed = {s: m & ~simple if s in later else m for s, m in allowed.items()}
    # the reference structure: the paper's Sim_mid (repaired at every detected anomaly), the same for every step
    mid = w.mid if w.anomalies is None else w.repair(w.mid, w.anomalies)  # type: ignore[arg-type]
    reference = cosine_similarity(mid)  # type: ignore[arg-type]
    feats, kept = progressive_calibration(
        lambda on: _calibrate(w, c, _switches(on)),
        lambda f: quality_score(f, text, logit_scale, reference, c.gate_entropy_weight),
        allowed,
        c.gate_threshold,
    )
    record.update({f"kept:{s}": k for s, k in kept.items()})
    return feats


def scclip_window_features(
    visual: nn.Module,
    crops: torch.Tensor,
    cfg: SCCLIPConfig,
    blocks: Mapping[str, torch.Tensor] | None = None,
    text: torch.Tensor | None = None,
    logit_scale: float | None = None,
) -> torch.Tensor:
    """SC-CLIP dense features of a batch of crops (no gradients): :func:`scclip_window_outputs` without its record.

    Returns:
        ``(B, gh, gw, E) float32`` features in the joint embedding space, not normalised.
    """
    return scclip_window_outputs(visual, crops, cfg, blocks, text, logit_scale)[0]
