"""CLIP input normalisation and named block-output aggregates of an open_clip visual tower.

An *aggregate name* selects what to extract from the residual stream of the tower
(blocks numbered 1..L, "output of block i" = residual stream after block i):

- ``"block:i"``: output of block ``i``; ``"block:0"`` is the input of block 1 (after ``ln_pre``).
- ``"mean:a-b"``: mean of the outputs of blocks ``a..b`` inclusive (CorrCLIP spatial branch:
  ``mean:6-10`` for ViT-B).
- ``"sum:a-b"``: sum of the outputs of blocks ``a..b`` inclusive (SC-CLIP multi-level fusion:
  ``sum:4-10`` for ViT-B).

All requested aggregates are computed in one pass that stops after the last needed block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ovseg_core import clip_ops

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Aggregate",
    "clip_block_outputs",
    "normalize_clip",
    "parse_aggregate",
]

CLIP_MEAN: tuple[float, float, float] = (122.771, 116.746, 104.094)
"""Per-channel RGB mean of the CLIP input normalisation, on the 0..255 scale."""

CLIP_STD: tuple[float, float, float] = (68.501, 66.632, 70.323)
"""Per-channel RGB standard deviation of the CLIP input normalisation, on the 0..255 scale."""

AggregateKind = Literal["block", "mean", "sum"]
_KINDS: tuple[str, ...] = ("block", "mean", "sum")
_NAME_RE = re.compile(r"^(block):(\d+)$|^(mean|sum):(\d+)-(\d+)$")


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> torch.Tensor:
    """``(images / scale - mean) / std`` per channel for ``(..., 3, H, W)`` images."""
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"images must be uint8 or floating point on 0..255, got dtype {images.dtype}")
    x = images.to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).reshape(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).reshape(3, 1, 1)
    return (x / scale - m) / s


def normalize_clip(images: torch.Tensor) -> torch.Tensor:
    """CLIP input normalisation with :data:`CLIP_MEAN` / :data:`CLIP_STD`.

    Args:
        images: ``(B, 3, H, W)`` (or ``(3, H, W)``) RGB, ``uint8`` or floating point on the
            0..255 scale (not 0..1).
    Returns:
        ``float32`` tensor of the same shape.
    """
    return _normalize(images, CLIP_MEAN, CLIP_STD, 1.0)


@dataclass(frozen=True)
class Aggregate:
    """A parsed aggregate name; see the module docstring for the grammar."""

    kind: AggregateKind  # "block" (one block's output), "mean" or "sum" over a block range
    start: int  # first block of the range, 1-based; 0 = input of block 1 (after ln_pre)
    stop: int  # last block of the range, inclusive; equals start for kind "block"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Aggregate.kind must be one of {_KINDS}, got {self.kind!r}")
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"Aggregate range must satisfy 0 <= start <= stop, got start={self.start} stop={self.stop}")
        if self.kind == "block" and self.start != self.stop:
            raise ValueError(f"Aggregate of kind 'block' needs start == stop, got {self.start} and {self.stop}")

    @property
    def name(self) -> str:
        """The canonical name, e.g. ``"block:11"`` or ``"mean:6-10"``."""
        if self.kind == "block":
            return f"block:{self.start}"
        return f"{self.kind}:{self.start}-{self.stop}"

    @property
    def blocks(self) -> range:
        """Block numbers whose outputs enter the aggregate."""
        return range(self.start, self.stop + 1)


def parse_aggregate(name: str, num_blocks: int | None = None) -> Aggregate:
    """Parse ``"block:i"``, ``"mean:a-b"`` or ``"sum:a-b"``.

    Args:
        name: the aggregate name.
        num_blocks: L, the number of blocks of the tower; when given, blocks above L are rejected.
    Raises:
        ValueError: malformed name, ``a > b``, or a block outside ``0..L``.
    """
    match = _NAME_RE.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"bad aggregate name {name!r}; expected 'block:i', 'mean:a-b' or 'sum:a-b' (1-based blocks)")
    if match.group(1):
        kind, start, stop = "block", int(match.group(2)), int(match.group(2))
    else:
        kind, start, stop = match.group(3), int(match.group(4)), int(match.group(5))
    if start > stop:
        raise ValueError(f"bad aggregate name {name!r}: range start {start} > stop {stop}")
    if num_blocks is not None and stop > num_blocks:
        raise ValueError(f"aggregate {name!r} needs block {stop} but the tower has blocks 0..{num_blocks}")
    return Aggregate(kind=kind, start=start, stop=stop)  # type: ignore[arg-type]


@torch.no_grad()
def clip_block_outputs(visual: nn.Module, crops: torch.Tensor, names: Sequence[str],
                       tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Named aggregates of block outputs, computed in one pass over the tower.

    The positional embedding is resized to the crop's token grid as the reference codes do
    (:func:`ovseg_core.clip_ops.embed_tokens`); blocks after the last needed one are not run.

    Args:
        visual: an open_clip ``VisionTransformer`` (e.g. ``clip_model.visual``).
        crops: ``(B, 3, H, W)`` CLIP-normalised crops (see :func:`normalize_clip`); H and W
            multiples of the patch size.
        names: aggregate names (see :func:`parse_aggregate`); duplicates are allowed.
        tokens: ``clip_ops.embed_tokens(visual, crops)[0]`` when the caller has it already (``(B, 1 + gh*gw, D)``);
            None: embedded here.
    Returns:
        ``{name: (B, 1 + gh*gw, D) float32}`` (CLS first, patches row-major), keyed by the
        names exactly as given.
    """
    if len(names) == 0:
        raise ValueError("names must list at least one aggregate, e.g. ['block:11']")
    num = clip_ops.num_blocks(visual)
    aggs = {name: parse_aggregate(name, num) for name in names}
    needed = frozenset(b for agg in aggs.values() for b in agg.blocks)
    last = max(needed)

    if tokens is None:
        tokens, _ = clip_ops.embed_tokens(visual, crops)
    outputs: dict[int, torch.Tensor] = {0: tokens}
    if last >= 1:
        _, kept = clip_ops.run_blocks(visual, tokens, 1, last, keep=needed)
        outputs.update(kept)

    result: dict[str, torch.Tensor] = {}
    for name, agg in aggs.items():
        if agg.kind == "block":
            result[name] = outputs[agg.start].float()
            continue
        total = torch.stack([outputs[b].float() for b in agg.blocks]).sum(dim=0)
        result[name] = total / len(agg.blocks) if agg.kind == "mean" else total
    return result
