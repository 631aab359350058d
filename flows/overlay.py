"""Label-map colours shared by the report and ``ovseg segment``: one palette everywhere.

The palette is the PASCAL VOC one (colour of class ``i`` from the bits of ``i`` interleaved
over R, G, B; 1 dark red, 2 dark green, ...) with one change: class 0 is white, not VOC's
black, because black is the colour of the ignore index (never scored) and class 0 is a real
class (VOC's background, ADE20K's wall). No other class below 2**18 is white (their channel
values are multiples of 4, and at most 224 below 512 classes). The palette is
defined for any non-negative index (distinct colours up to 2**24 - 1 classes), so datasets
with more than 256 classes still get stable colours. The ignore index (255 by default) is
always black.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.patches import Patch

__all__ = ["CLASS0_COLOR", "IGNORE_COLOR", "class_color", "colorize", "legend_patches", "overlay", "palette", "render_overlay_figure"]

IGNORE_COLOR = (0, 0, 0)  # RGB of the ignore index (never scored): black
CLASS0_COLOR = (255, 255, 255)  # RGB of class 0 (VOC's black would read as "ignored"): white
_VOC_PALETTE_SIZE = 256  # the classic VOC palette length; longer palettes continue the same bit pattern


def palette(n: int = _VOC_PALETTE_SIZE) -> np.ndarray:
    """The VOC-style palette.

    Args:
        n: number of colours (>= 1).

    Returns:
        ``(n, 3) uint8``: row ``i`` is the colour of class ``i``: ``CLASS0_COLOR`` for row 0,
        the VOC colour otherwise (row 255 is VOC's own colour; :func:`colorize` paints the
        ignore index black instead).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    idx = np.arange(int(n), dtype=np.int64)
    rgb = np.zeros((int(n), 3), dtype=np.int64)
    c = idx.copy()
    for j in range(8):  # 8 rounds of 3 bits each: bit 0 -> R, bit 1 -> G, bit 2 -> B, most significant first
        for ch in range(3):
            rgb[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    rgb[0] = CLASS0_COLOR
    return rgb.astype(np.uint8)


def class_color(index: int, ignore_index: int | None = 255) -> tuple[int, int, int]:
    """RGB colour of one class index (the ignore index is black)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if ignore_index is not None and index == ignore_index:
        return IGNORE_COLOR
    r, g, b = palette(int(index) + 1)[-1]
    return int(r), int(g), int(b)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an (H, W) integer numpy array, got {type(labels).__name__} {getattr(labels, 'shape', None)} "
            f"{getattr(labels, 'dtype', '')}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {int(labels.min())}")
    return labels


def colorize(labels: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Paint a label map with the palette.

    Args:
        labels: ``(H, W)`` non-negative integer class indices (any integer dtype).
        ignore_index: index painted black (None: no special index).

    Returns:
        ``(H, W, 3) uint8`` RGB.
    """
    labels = _check_labels(labels)
    top = int(labels.max()) + 1 if labels.size else 1
    pal = palette(max(top, _VOC_PALETTE_SIZE))
    if ignore_index is not None and 0 <= ignore_index < len(pal):
        pal[ignore_index] = IGNORE_COLOR
    return pal[labels.astype(np.int64, copy=False)]


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5, ignore_index: int | None = 255) -> np.ndarray:
    """Blend the colourised label map over an image.

    Args:
        image_rgb: ``(H, W, 3) uint8`` RGB image.
        labels: ``(H, W)`` integer class indices at the image's resolution.
        alpha: label colour weight in [0, 1] (0: image only, 1: colours only).
        ignore_index: index painted black (None: no special index).

    Returns:
        ``(H, W, 3) uint8`` RGB: ``round((1 - alpha) * image + alpha * colour)``.
    """
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(
            f"image_rgb must be an (H, W, 3) uint8 array, got {type(image_rgb).__name__} "
            f"{getattr(image_rgb, 'shape', None)} {getattr(image_rgb, 'dtype', '')}"
        )
    labels = _check_labels(labels)
    if labels.shape != image_rgb.shape[:2]:
        raise ValueError(
            f"labels shape {labels.shape} does not match image shape {image_rgb.shape[:2]}; "
            "resize the label map to the image (nearest) first"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    colours = colorize(labels, ignore_index).astype(np.float32)
    blended = (1.0 - float(alpha)) * image_rgb.astype(np.float32) + float(alpha) * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def legend_patches(class_names: Sequence[str], present: Iterable[int], ignore_index: int | None = 255) -> list[Patch]:
    """Matplotlib legend handles for the classes present, in index order.

    Args:
        class_names: name of each class index.
        present: class indices to list (duplicates and the ignore index are dropped; an index
            without a name is labelled by its number).
        ignore_index: index never listed.

    Returns:
        ``list[matplotlib.patches.Patch]`` with the palette colour and ``"<index> <name>"`` labels.
    """
    from matplotlib.patches import Patch

    out = []
    for i in sorted({int(p) for p in present}):
        if i < 0:
            raise ValueError(f"present class indices must be >= 0, got {i}")
        if ignore_index is not None and i == ignore_index:
            continue
        name = class_names[i] if i < len(class_names) else str(i)
        out.append(Patch(facecolor=np.asarray(class_color(i, ignore_index)) / 255.0, edgecolor="black", linewidth=0.5,
                         label=f"{i} {name}"))
    return out


def render_overlay_figure(image_rgb: np.ndarray, labels: np.ndarray, class_names: Sequence[str], out: str | Path,
                          title: str = "", random_weights: bool = False, alpha: float = 0.5) -> Path:
    """Write a PNG: the image beside its label overlay, with a legend of the classes present.

    Args:
        image_rgb: ``(H, W, 3) uint8``.
        labels: ``(H, W)`` integer class indices of the same size.
        class_names: name of each class index.
        out: PNG path.
        title: figure title; ``[random weights]`` is appended when ``random_weights``.
        random_weights: mark the figure as made with random-weight backbones.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    labels = np.asarray(labels)
    if labels.shape != image_rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {image_rgb.shape[:2]} must have the same size")
    h, w = labels.shape
    fig = Figure(figsize=(2 * 5 * w / max(h, w) + 2.5, 5 * h / max(h, w) + 0.8), dpi=100)
    axes = fig.subplots(1, 2)
    axes[0].imshow(image_rgb)
    axes[0].set_title("input")
    axes[1].imshow(overlay(image_rgb, labels, alpha))
    axes[1].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    fig.legend(handles=legend_patches(class_names, np.unique(labels)), loc="center right", fontsize=8, frameon=False)
    full = (title + " [random weights]") if random_weights else title
    fig.suptitle(full, color="red" if random_weights else "black")
    fig.subplots_adjust(right=0.8)
    path = Path(out)
    fig.savefig(path)
    return path
