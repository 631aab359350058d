"""Label-map colours shared by the report, ``ovseg export`` and ``ovseg segment``: one palette everywhere.

The palette is the PASCAL VOC one (colour of class ``i`` from the bits of ``i`` interleaved
over R, G, B; 1 dark red, 2 dark green, ...) with one change, because black is the colour of
the ignore index (never scored):

- a vocabulary whose class 0 is a background class (``background=True``: VOC21, PC60,
  COCO-Object, or any vocabulary whose class 0 is named "background", see
  :func:`has_background`) paints class 0 **white** instead of VOC's black, and class ``i`` with
  VOC colour ``i``;
- every other vocabulary (a custom one such as "sky; tree; road", ADE20K whose class 0 is
  wall) has no class to set apart: class ``i`` gets VOC colour ``i + 1`` (class 0 dark red),
  so that class 0 never looks unlabelled (white) or ignored (black).

No other class below 2**18 is white or black (their channel values are multiples of 4, and at
most 224 below 512 classes). The palette is defined for any non-negative index (distinct
colours up to 2**24 - 2 classes), so datasets with more than 256 classes still get stable
colours. The ignore index (255 by default) is always black.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.patches import Patch

__all__ = ["BACKGROUND_NAME", "CLASS0_COLOR", "IGNORE_COLOR", "class_color", "colorize", "has_background",
           "legend_panel", "legend_patches", "overlay", "overlay_with_legend", "palette", "render_overlay_figure"]

IGNORE_COLOR = (0, 0, 0)  # RGB of the ignore index (never scored): black
CLASS0_COLOR = (255, 255, 255)  # RGB of a background class 0 (VOC's black would read as "ignored"): white
BACKGROUND_NAME = "background"  # a vocabulary whose class 0 has this name paints it white
_VOC_PALETTE_SIZE = 256  # the classic VOC palette length; longer palettes continue the same bit pattern


def has_background(class_names: Sequence[str]) -> bool:
    """Whether a vocabulary's class 0 is a background class (named ``BACKGROUND_NAME``, any case).

    The pipeline names the background class of VOC21, PC60 and COCO-Object "background"
    (``flows.graph.class_names``); a custom vocabulary may start with it too.
    """
    return bool(class_names) and str(class_names[0]).strip().lower() == BACKGROUND_NAME


def palette(n: int = _VOC_PALETTE_SIZE, background: bool = True) -> np.ndarray:
    """The VOC-style palette.

    Args:
        n: number of colours (>= 1).
        background: class 0 is a background class (see the module docstring).

    Returns:
        ``(n, 3) uint8``: row ``i`` is the colour of class ``i``. With ``background``:
        ``CLASS0_COLOR`` for row 0, VOC colour ``i`` otherwise (row 255 is VOC's own colour;
        :func:`colorize` paints the ignore index black instead). Without: VOC colour ``i + 1``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    shift = 0 if background else 1
    c = np.arange(shift, int(n) + shift, dtype=np.int64)
    rgb = np.zeros((int(n), 3), dtype=np.int64)
    for j in range(8):  # 8 rounds of 3 bits each: bit 0 -> R, bit 1 -> G, bit 2 -> B, most significant first
        for ch in range(3):
            rgb[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    if background:
        rgb[0] = CLASS0_COLOR
    return rgb.astype(np.uint8)


def class_color(index: int, ignore_index: int | None = 255, background: bool = True) -> tuple[int, int, int]:
    """RGB colour of one class index (the ignore index is black; ``background`` as in :func:`palette`)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if ignore_index is not None and index == ignore_index:
        return IGNORE_COLOR
    r, g, b = palette(int(index) + 1, background)[-1]
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


def colorize(labels: np.ndarray, ignore_index: int | None = 255, background: bool = True) -> np.ndarray:
    """Paint a label map with the palette.

    Args:
        labels: ``(H, W)`` non-negative integer class indices (any integer dtype).
        ignore_index: index painted black (None: no special index).
        background: class 0 is a background class (white); else every class is shifted (see :func:`palette`).

    Returns:
        ``(H, W, 3) uint8`` RGB.
    """
    labels = _check_labels(labels)
    top = int(labels.max()) + 1 if labels.size else 1
    pal = palette(max(top, _VOC_PALETTE_SIZE), background)
    if ignore_index is not None and 0 <= ignore_index < len(pal):
        pal[ignore_index] = IGNORE_COLOR
    return pal[labels.astype(np.int64, copy=False)]


def overlay(image_rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.5, ignore_index: int | None = 255,
            background: bool = True) -> np.ndarray:
    """Blend the colourised label map over an image.

    Args:
        image_rgb: ``(H, W, 3) uint8`` RGB image.
        labels: ``(H, W)`` integer class indices at the image's resolution.
        alpha: label colour weight in [0, 1] (0: image only, 1: colours only).
        ignore_index: index painted black (None: no special index).
        background: class 0 is a background class (see :func:`palette`).

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
    colours = colorize(labels, ignore_index, background).astype(np.float32)
    blended = (1.0 - float(alpha)) * image_rgb.astype(np.float32) + float(alpha) * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def legend_patches(class_names: Sequence[str], present: Iterable[int], ignore_index: int | None = 255,
                   background: bool | None = None) -> list[Patch]:
    """Matplotlib legend handles for the classes present, in index order.

    Args:
        class_names: name of each class index.
        present: class indices to list (duplicates and the ignore index are dropped; an index
            without a name is labelled by its number).
        ignore_index: index never listed.
        background: as in :func:`palette`; None = :func:`has_background` of ``class_names``.

    Returns:
        ``list[matplotlib.patches.Patch]`` with the palette colour and ``"<index> <name>"`` labels.
    """
    from matplotlib.patches import Patch

    if background is None:
        background = has_background(class_names)
    out = []
    for i in sorted({int(p) for p in present}):
        if i < 0:
            raise ValueError(f"present class indices must be >= 0, got {i}")
        if ignore_index is not None and i == ignore_index:
            continue
        name = class_names[i] if i < len(class_names) else str(i)
        out.append(Patch(facecolor=np.asarray(class_color(i, ignore_index, background)) / 255.0, edgecolor="black",
                         linewidth=0.5,
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

    Class 0 is white only when it is named "background" (:func:`has_background`).
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
    background = has_background(class_names)
    axes[1].imshow(overlay(image_rgb, labels, alpha, background=background))
    axes[1].set_title("prediction")
    for ax in axes:
        ax.axis("off")
    fig.legend(handles=legend_patches(class_names, np.unique(labels), background=background), loc="center right",
               fontsize=8, frameon=False)
    full = (title + " [random weights]") if random_weights else title
    fig.suptitle(full, color="red" if random_weights else "black")
    fig.subplots_adjust(right=0.8)
    path = Path(out)
    fig.savefig(path)
    return path


LEGEND_FONT_PX = 13  # text size of the legend panel of exported overlays
LEGEND_ROW_PX = 18  # one legend row: swatch and "<index> <name>"
LEGEND_COLUMN_PX = 190  # one legend column; names longer than fits are cut with "…"


def legend_panel(class_names: Sequence[str], present: Iterable[int], height: int, ignore_index: int | None = 255,
                 background: bool | None = None) -> np.ndarray:
    """A white panel listing the classes present (swatch, index, name), in as many columns as ``height`` needs.

    Args:
        class_names: name of each class index.
        present: class indices to list (the ignore index is dropped).
        height: panel height in pixels (the image's); at least one row is always drawn.
        ignore_index: index never listed.
        background: as in :func:`palette`; None = :func:`has_background` of ``class_names``.

    Returns:
        ``(max(height, LEGEND_ROW_PX + 8), columns * LEGEND_COLUMN_PX, 3) uint8`` RGB.
    """
    from PIL import Image, ImageDraw, ImageFont

    if background is None:
        background = has_background(class_names)
    idx = [i for i in sorted({int(p) for p in present}) if ignore_index is None or i != ignore_index]
    h = max(int(height), LEGEND_ROW_PX + 8)
    per_col = max(1, (h - 8) // LEGEND_ROW_PX)
    cols = max(1, -(-len(idx) // per_col))
    img = Image.new("RGB", (cols * LEGEND_COLUMN_PX, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=LEGEND_FONT_PX)
    for n, i in enumerate(idx):
        x, y = 6 + (n // per_col) * LEGEND_COLUMN_PX, 4 + (n % per_col) * LEGEND_ROW_PX
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=class_color(i, ignore_index, background), outline=(0, 0, 0))
        text = f"{i} {class_names[i] if i < len(class_names) else i}"
        while len(text) > 2 and draw.textlength(text, font=font) > LEGEND_COLUMN_PX - 28:
            text = text[:-2] + "…"
        draw.text((x + 18, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def overlay_with_legend(image_rgb: np.ndarray, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5,
                        ignore_index: int | None = 255) -> np.ndarray:
    """:func:`overlay` with :func:`legend_panel` of the classes present on its right (``ovseg export --format overlay``).

    Returns:
        ``(H', W + legend width, 3) uint8``; ``H' = H`` unless the image is shorter than one legend row.
    """
    background = has_background(class_names)
    blended = overlay(image_rgb, labels, alpha, ignore_index, background)
    panel = legend_panel(class_names, np.unique(labels), blended.shape[0], ignore_index, background)
    if panel.shape[0] > blended.shape[0]:
        pad = np.full((panel.shape[0] - blended.shape[0], *blended.shape[1:]), 255, np.uint8)
        blended = np.concatenate([blended, pad])
    return np.concatenate([blended, panel], axis=1)
