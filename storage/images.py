"""Image and label decoding: every mode normalised to one array contract.

- :func:`load_rgb` -> ``(H, W, 3) uint8`` RGB. Palette (P/PA) is expanded through its palette,
  L/1/I;16 grey is replicated to three channels, LA/RGBA/PA drop alpha (no compositing), CMYK
  and other colour spaces use Pillow's conversion, 16-bit grey (``I;16*``, ``I``) is scaled to
  8 bit by ``round(v / 257)``. EXIF orientation is **not** applied: benchmark images and their
  ground truth are stored unrotated and the ground truth is aligned with the stored pixels.
  Multi-page TIFF (and camera MPO JPEG) use their first frame; an *animated* GIF, PNG (APNG),
  WebP or AVIF is refused (ovseg segments still images); a single-frame GIF is decoded.
- :func:`load_label` -> ``(H, W)`` class indices: palette PNGs are read as indices (never
  through the palette), L as is (``uint8``), 16-bit grey (``I;16*``: CAT-Seg's ADE-847 / PC-459
  ``.tif`` labels, any byte order, compressed or not) exactly as ``uint16`` (no scaling: 65535
  stays 65535, as the references' ``astype(np.uint16)``), 32-bit integer (``I``) as ``int32``.

Pixel limit: the width and height are read from the header and checked against ``max_pixels``
(default :data:`DEFAULT_MAX_PIXELS`) before any pixel is decoded; a larger image raises
:class:`ImageTooLargeError`. Pillow's own decompression-bomb limit (the process-global
``PIL.Image.MAX_IMAGE_PIXELS``) is never changed at import; it is lifted only around the header
read, and around the decode of an image that is within ``max_pixels`` but over Pillow's limit,
under a module lock that also restores it (see :func:`_pillow_limit_lifted`).

Every failure of one file (missing, zero-byte, truncated, undecodable, too large, animated, out
of memory, or anything else the decoder raises) is an :class:`ImageError` naming the file and
the fix, chained to the original exception.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from os import PathLike
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "UNUSABLE_EXTENSIONS",
    "ImageError",
    "ImageTooLargeError",
    "check_max_pixels",
    "content_hash",
    "load_label",
    "load_rgb",
]

# Default pixel limit: 8192 x 8192 = 67,108,864 pixels (64 Mi). Every benchmark image (<= ~4 MP)
# and every common camera photo (48-50 MP phone modes) passes; it stays below Pillow's own
# warning threshold (89,478,485), and the decoded RGB image is <= 192 MiB. Larger images are
# impractical for ovseg anyway: the merged logits are (Q, H, W) float32 at the original size.
DEFAULT_MAX_PIXELS = 8192 * 8192
_CHUNK = 1 << 20
# Extensions ovseg decodes when it finds images by extension (a GIF only with a single frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_RASTER = "convert it to PNG or JPEG"
# Image-like extensions ovseg does not decode: what the file is and what to do (error rows in a folder).
UNUSABLE_EXTENSIONS: Mapping[str, str] = MappingProxyType({
    **dict.fromkeys((".svg", ".svgz"), "vector graphics (SVG) have no pixels to segment; rasterise it to PNG "
                                      "(e.g. rsvg-convert -o out.png in.svg)"),
    **dict.fromkeys((".heic", ".heif"), f"HEIC/HEIF photo, which Pillow cannot decode without a plugin; {_RASTER}"),
    ".avif": f"AVIF image, which only some Pillow builds decode; {_RASTER}",
    ".jxl": f"JPEG XL image, which Pillow does not decode; {_RASTER}",
    **dict.fromkeys((".jp2", ".j2k", ".jpx", ".jpf"), f"JPEG 2000 image, which only some Pillow builds decode; {_RASTER}"),
    **dict.fromkeys((".ico", ".icns", ".cur"), "icon file holding several sizes; export the size you want as PNG"),
    ".psd": "Photoshop document with layers; flatten it and export it as PNG",
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"),
                    "camera raw file; develop it to JPEG, PNG or TIFF"),
    **dict.fromkeys((".exr", ".hdr"), "floating-point HDR image; tone-map it to an 8-bit PNG"),
    **dict.fromkeys((".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".pcx"), "format outside ovseg's accepted list; "
                                                                        "convert it to PNG"),
})
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "AVIF"})  # formats whose extra frames are animation
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageError(ValueError):
    """A file that cannot be decoded into the required array; the message names file and fix."""


class ImageTooLargeError(ImageError):
    """An image whose header gives more than ``max_pixels`` pixels (nothing was decoded)."""

    def __init__(self, path: Path, width: int, height: int, max_pixels: int):
        self.path, self.width, self.height, self.max_pixels = path, width, height, max_pixels
        pixels = width * height
        super().__init__(
            f"{path}: image is {width}x{height} = {pixels:,} pixels, over the limit max_pixels={max_pixels:,} "
            f"(decoded RGB alone would take {3 * pixels / 2**20:,.0f} MiB); downscale the image, or raise "
            f"max_pixels in the dataset entry to at least {pixels} if you have the memory"
        )


def check_max_pixels(max_pixels: int | None) -> int | None:
    """Validate a pixel limit: a positive int, or ``None`` for no limit."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer (pixels) or None for no limit, got {max_pixels!r}")
    return max_pixels


@contextmanager
def _pillow_limit_lifted() -> Iterator[int | None]:
    """Hold the module lock with ``PIL.Image.MAX_IMAGE_PIXELS = None``; yields the previous value.

    Pillow reads that process-global at every header and frame check. ovseg applies its own
    per-call limit, so Pillow's must not fire first (it would warn, or raise
    ``DecompressionBombError`` before the size is known). The lock serialises every ovseg
    save/set/restore, so concurrent decodes in threads always restore the original value; code
    outside ovseg that opens an image during such a window sees no Pillow limit.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield saved
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode_error(p: Path, e: BaseException, size: tuple[int, int] | None) -> ImageError:
    if isinstance(e, UnidentifiedImageError):
        return ImageError(f"{p}: not a recognised image format; convert it to PNG or JPEG or remove it")
    if isinstance(e, MemoryError):
        dims = f" a {size[0]}x{size[1]} image" if size else ""
        return ImageError(f"{p}: out of memory decoding{dims}; downscale the image or remove it")
    return ImageError(f"{p}: cannot decode ({type(e).__name__}: {e}); the file is truncated or corrupt, re-copy it")


def _open(path: str | PathLike[str], max_pixels: int | None) -> Image.Image:
    """Open, check and fully decode an image, mapping every failure to :class:`ImageError`.

    The caller closes the returned image (``with _open(...) as im``).
    """
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such file; check the dataset root and layout")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: zero-byte file; re-copy or re-download it, or remove it from the dataset")
    im: Image.Image | None = None
    try:
        with _pillow_limit_lifted() as pillow_limit:
            im = Image.open(p)  # reads the header only
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(p, width, height, max_pixels)
        over_pillow = pillow_limit is not None and width * height > pillow_limit  # allowed by max_pixels
        with _pillow_limit_lifted() if over_pillow else nullcontext():  # frame checks read the global too
            if im.format in _ANIMATION_FORMATS and getattr(im, "is_animated", False):
                raise ImageError(
                    f"{p}: animated {im.format} (more than one frame); ovseg segments still images: save the "
                    "frame you want as PNG (e.g. ffmpeg -i in.gif -frames:v 1 out.png) or remove the file"
                )
            im.load()
    except ImageError:
        if im is not None:
            im.close()
        raise
    # A decoder reading untrusted bytes: whatever it raises (OSError, SyntaxError, ValueError,
    # struct.error, MemoryError, DecompressionBombError, ...) is this one file's error.
    except Exception as e:
        size = im.size if im is not None else None
        if im is not None:
            im.close()
        raise _decode_error(p, e, size) from e
    return im


def _sixteen_to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (``v / 257``)."""
    return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def _rgb_array(im: Image.Image, path: str | PathLike[str]) -> np.ndarray:
    """``(H, W, 3) uint8`` from a decoded image of any supported mode."""
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


def load_rgb(path: str | PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image as RGB.

    Args:
        path: image file.
        max_pixels: refuse images with more pixels (width x height, from the header, before
            decoding); ``None`` = no limit (e.g. for an image an ingest already checked).

    Returns:
        ``(H, W, 3) uint8`` C-contiguous RGB (see the module docstring for mode handling).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageError: missing, zero-byte, truncated, undecodable, animated or floating-point
            image, or out of memory.
        ValueError: ``max_pixels`` is not a positive int or None.
    """
    return _decode(path, max_pixels, _rgb_array)


def _decode(path: str | PathLike[str], max_pixels: int | None, convert) -> np.ndarray:
    """Open (size checked from the header), decode and ``convert(image, path)``; any failure is an ``ImageError``."""
    check_max_pixels(max_pixels)
    with _open(path, max_pixels) as im:
        try:
            return convert(im, path)
        except ImageError:
            raise
        except Exception as e:  # conversion of decoded pixels (MemoryError on huge images, ...)
            raise _decode_error(Path(path), e, im.size) from e


def _label_array(im: Image.Image, path: str | PathLike[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "L"):
        return np.ascontiguousarray(np.asarray(im), dtype=np.uint8)
    if mode == "1":
        return np.asarray(im).astype(np.uint8)
    if mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.uint16)  # native byte order, values unchanged
    if mode == "I":
        return np.asarray(im).astype(np.int32)
    raise ImageError(
        f"{path}: label map has mode {mode}; expected class indices (palette P or grey L PNG). "
        "Colour-coded labels must be converted to index PNGs with the dataset's colour map first"
    )


def load_label(path: str | PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label map as class indices.

    Args:
        path: label map (palette or single-channel PNG, 16-bit TIFF, ...).
        max_pixels: as for :func:`load_rgb`.

    Returns:
        ``(H, W)`` class indices: ``uint8`` (P, L, 1), ``uint16`` (16-bit, values exact) or ``int32``
        (32-bit integer).

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels.
        ImageError: undecodable file, or a colour-coded (RGB/RGBA) label map.
        ValueError: ``max_pixels`` is not a positive int or None.
    """
    return _decode(path, max_pixels, _label_array)


def content_hash(path: str | PathLike[str]) -> str:
    """SHA-256 hex digest of the file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
