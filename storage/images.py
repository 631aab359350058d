"""Image and label decoding: every mode normalised to one array contract.

- :func:`load_rgb` -> ``(H, W, 3) uint8`` RGB. Palette (P/PA) is expanded through its palette,
  L/1/I;16 grey is replicated to three channels, LA/RGBA/PA drop alpha (no compositing), CMYK
  and other colour spaces use Pillow's conversion, 16-bit grey (``I;16*``, ``I``) is scaled to
  8 bit by ``round(v / 257)``. EXIF orientation is **not** applied: benchmark images and their
  ground truth are stored unrotated and the ground truth is aligned with the stored pixels.
  Multi-frame files (GIF, TIFF) use their first frame.
- :func:`load_label` -> ``(H, W)`` class indices: palette PNGs are read as indices (never
  through the palette), L as is (``uint8``), 16/32-bit grey as ``int32``.

Zero-byte, truncated or undecodable files raise :class:`ImageError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "content_hash", "load_label", "load_rgb"]

_CHUNK = 1 << 20
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """A file that cannot be decoded into the required array; the message names file and fix."""


def _open(path: str | PathLike[str]) -> Image.Image:
    """Open and fully decode an image, mapping every failure to :class:`ImageError`."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file; check the dataset root and layout")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: zero-byte file; re-copy or re-download it, or remove it from the dataset")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(p)
            im.load()
    except UnidentifiedImageError as e:
        raise ImageError(f"{p}: not a recognised image format; convert it to PNG or JPEG or remove it") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: cannot decode ({e}); the file is truncated or corrupt, re-copy it") from e
    return im


def _sixteen_to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (``v / 257``)."""
    return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def load_rgb(path: str | PathLike[str]) -> np.ndarray:
    """Decode an image as RGB.

    Args:
        path: image file.

    Returns:
        ``(H, W, 3) uint8`` C-contiguous RGB (see the module docstring for mode handling).

    Raises:
        ImageError: missing, zero-byte, truncated, undecodable or floating-point image.
    """
    im = _open(path)
    mode = im.mode
    if mode == "RGB":
        rgb = np.asarray(im)
    elif mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer image with values outside 0..65535; convert it to 8-bit RGB")
        grey = _sixteen_to_uint8(a) if (mode != "I" or a.max() > 255) else a.astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    elif mode == "F":
        raise ImageError(f"{path}: floating-point image (mode F) is not supported; convert it to 8-bit RGB")
    elif mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGBA"))[..., :3]
    else:  # L, 1, LA, RGBA, RGBa, CMYK, YCbCr, LAB, HSV, ...
        try:
            rgb = np.asarray(im.convert("RGB"))
        except (ValueError, OSError) as e:
            raise ImageError(f"{path}: cannot convert mode {mode} to RGB ({e}); convert it to 8-bit RGB") from e
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_label(path: str | PathLike[str]) -> np.ndarray:
    """Decode a label map as class indices.

    Args:
        path: label PNG (palette or single-channel).

    Returns:
        ``(H, W)`` ``uint8`` (P, L, 1) or ``int32`` (16/32-bit integer) class indices.

    Raises:
        ImageError: undecodable file, or a colour-coded (RGB/RGBA) label map.
    """
    im = _open(path)
    mode = im.mode
    if mode in ("P", "L"):
        return np.ascontiguousarray(np.asarray(im), dtype=np.uint8)
    if mode == "1":
        return np.asarray(im).astype(np.uint8)
    if mode in _SIXTEEN_BIT or mode == "I":
        return np.asarray(im).astype(np.int32)
    raise ImageError(
        f"{path}: label map has mode {mode}; expected class indices (palette P or grey L PNG). "
        "Colour-coded labels must be converted to index PNGs with the dataset's colour map first"
    )


def content_hash(path: str | PathLike[str]) -> str:
    """SHA-256 hex digest of the file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
