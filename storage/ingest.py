"""Dataset ingestion: list the image / ground-truth pairs of an on-disk benchmark layout.

Layouts are the MMSegmentation on-disk layouts the full benchmarks use, and ``folder`` for any
images: ``storage.layouts.LAYOUTS`` (one entry per layout: what it reads, the datasets it feeds).

Every image is decoded once (``storage.images.load_rgb``) and its ground truth read as indices;
an unreadable, animated or too large image (over ``max_pixels``, checked from the header), a
missing or unreadable ground truth, or a size mismatch gives a row with ``status="error"`` and a
message, and ingestion continues with the other files.

Paths stay inside the dataset: an image or ground truth whose real path (symbolic links, ``..``
and absolute entries of a split list resolved) leaves the dataset root is an error row unless
``follow_symlinks=True``. The root is the ``root`` argument and the layout's base folder found in
it (both resolved, so a root that is itself a link is fine; ``gt_dir`` for the folder layout's
ground truth). In the folder layout a linked folder inside the root is not descended (its files
are listed at their real path); a linked folder outside the root is one error row, or descended
with ``follow_symlinks=True`` (each real folder once, so link cycles end).

Image ids are stable and key-safe: ``f"{safe_stem}-{sha256(content_sha256 + rel_path)[:12]}"``
with ``rel_path`` relative to the layout's base folder, so the same files give the same ids
wherever the dataset lives (an absolute split-list entry keeps its absolute path as ``rel_path``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from tqdm import tqdm

from ovseg_core.datasets import DATASETS
from ovseg_core.names import did_you_mean
from storage.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    UNUSABLE_EXTENSIONS,
    ImageError,
    check_max_pixels,
    content_hash,
    load_label,
    load_rgb,
)
from storage.layouts import (
    FOLLOW_FIX,
    LAYOUTS,
    Candidate,
    abs_path,
    confine,
    forget_resolved_folders,
    list_layout,
)

__all__ = ["IMAGE_EXTENSIONS", "LAYOUTS", "UNUSABLE_EXTENSIONS", "ManifestRow", "image_id_for", "ingest",
           "ingest_files"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ManifestRow:
    """One image of an ingested dataset (schema: ``storage.tables.MANIFEST_SCHEMA``)."""

    dataset: str  # DatasetSpec name this image feeds (or a custom name for "folder")
    image_id: str  # stable key-safe id: f"{safe_stem}-{12 hex}"
    rel_path: str  # POSIX path relative to the layout's base folder
    abs_path: str  # absolute path of the image
    gt_path: str  # absolute path of the ground truth, "" if none
    width: int  # decoded image width (0 on error)
    height: int  # decoded image height (0 on error)
    content_sha256: str  # sha256 of the image bytes ("" if unreadable or refused without reading)
    status: str  # "ok" | "error"
    error: str  # "" if ok, else what is wrong and the fix
    file_stat: str = ""  # size and mtime of the image and ground truth files: an unchanged row is reused on re-ingest


def _safe_stem(rel_path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel_path).stem).strip("_")
    return stem[:64] or "img"


def image_id_for(content_sha256: str, rel_path: str) -> str:
    """Stable, key-safe image id from the content hash and the relative path."""
    digest = hashlib.sha256((content_sha256 + rel_path).encode("utf-8")).hexdigest()[:12]
    return f"{_safe_stem(rel_path)}-{digest}"


def _file_stat(c: Candidate) -> str:
    """``size:mtime_ns`` of the image and of its ground truth ("" when a file is missing)."""
    parts = []
    for p in (c.image, c.gt):
        try:
            st = p.stat() if p is not None else None
        except (OSError, ValueError):
            return ""
        parts.append(f"{st.st_size}:{st.st_mtime_ns}" if st is not None else "-")
    return "|".join(parts)


def _reusable(old: ManifestRow | None, dataset: str, c: Candidate, gt_path: str, stat: str,
              max_pixels: int | None) -> bool:
    return (
        old is not None and old.status == "ok" and bool(stat) and old.file_stat == stat and old.rel_path == c.rel_path
        and old.gt_path == gt_path and old.dataset == dataset
        and (max_pixels is None or old.width * old.height <= max_pixels)
    )


def _row(dataset: str, c: Candidate, previous: Mapping[str, ManifestRow] | None = None,
         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ManifestRow:
    """Decode one candidate into a manifest row; failures become an error row.

    A row of ``previous`` (keyed by absolute image path) is reused without reading the files
    when it is ``ok``, within ``max_pixels`` and the image and ground-truth sizes and mtimes are
    unchanged. A candidate refused while listing gives an error row without reading its file.
    """
    image_path, gt_path = abs_path(c.image), (abs_path(c.gt) if c.gt is not None else "")
    if c.error:
        return ManifestRow(dataset=dataset, image_id=image_id_for("", c.rel_path), rel_path=c.rel_path,
                           abs_path=image_path, gt_path=gt_path, width=0, height=0, content_sha256="",
                           status="error", error=c.error, file_stat="")
    stat = _file_stat(c)
    old = previous.get(image_path) if previous else None
    if _reusable(old, dataset, c, gt_path, stat, max_pixels):
        return old
    sha, width, height, error = "", 0, 0, ""
    try:
        if not c.image.is_file():
            if c.image.is_symlink():
                raise ImageError(f"{c.image}: broken symbolic link to {os.readlink(c.image)}; fix or remove it")
            raise ImageError(f"{c.image}: image listed by the layout is missing; check the split list and folder")
        sha = content_hash(c.image)
        img = load_rgb(c.image, max_pixels)
        height, width = img.shape[:2]
        del img
        if c.gt is not None:
            if not c.gt.is_file():
                raise ImageError(f"{c.gt}: ground truth missing for {c.rel_path}; add it or remove the image")
            gt = load_label(c.gt, max_pixels)
            if gt.shape != (height, width):
                raise ImageError(
                    f"{c.gt}: ground truth is {gt.shape[1]}x{gt.shape[0]} but the image is {width}x{height}; "
                    "they must have the same size"
                )
    except (ImageError, OSError) as e:
        error = str(e)
        width = height = 0
    return ManifestRow(
        dataset=dataset,
        image_id=image_id_for(sha, c.rel_path),
        rel_path=c.rel_path,
        abs_path=image_path,
        gt_path=gt_path,
        width=int(width),
        height=int(height),
        content_sha256=sha,
        status="error" if error else "ok",
        error=error,
        file_stat=stat,
    )


def _resolve_dataset(layout: str, dataset: str | None) -> str:
    feeds = LAYOUTS[layout].datasets
    if dataset is None:
        return feeds[0]
    if layout == "folder":
        if not dataset or "/" in dataset or dataset.startswith("."):
            raise ValueError(f"dataset name {dataset!r} must be non-empty, without '/', not starting with '.'")
        return dataset
    by_lower = {k.lower(): k for k in DATASETS}
    name = by_lower.get(dataset.lower(), dataset)
    if name not in feeds:
        raise ValueError(f"layout {layout!r} feeds datasets {feeds}, got dataset={dataset!r}")
    return name



def _terminal() -> bool:
    """Progress bars only on a terminal: redirected logs get no carriage-return lines."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False

def ingest(
    root: str | PathLike[str],
    layout: str,
    dataset: str | None = None,
    split: str = "val",
    gt_dir: str | PathLike[str] | None = None,
    progress: bool = False,
    previous: Sequence[ManifestRow] = (),
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    follow_symlinks: bool = False,
) -> list[ManifestRow]:
    """List and check every image of a dataset on disk.

    Args:
        root: dataset folder (the layout's base folder or a parent of it).
        layout: one of ``storage.layouts.LAYOUTS``.
        dataset: DatasetSpec name the images feed (default: the layout's first ``datasets``;
            VOC may feed VOC20, Pascal Context PC59); any key-safe name for ``"folder"``.
        split: split name (``"val"``; ADE20K maps it to ``validation``, COCO to ``val2017``).
        gt_dir: ``"folder"`` layout only: folder of ground-truth maps matched by relative path
            without extension.
        progress: show a tqdm progress bar.
        previous: rows of an earlier ingest (e.g. the stored manifest); an image whose files
            are unchanged (size and mtime) keeps its row without being read and hashed again.
        max_pixels: images (and ground truths) with more pixels are error rows, checked from the
            header before decoding (default :data:`storage.images.DEFAULT_MAX_PIXELS`, 8192x8192);
            ``None`` = no limit.
        follow_symlinks: accept images, ground truths and linked folders whose real path leaves
            the dataset root (links, ``..`` or absolute split-list entries); refused as error
            rows by default.

    Returns:
        Rows sorted by ``rel_path``; bad images are rows with ``status="error"``.

    Raises:
        ValueError: unknown layout, incompatible dataset, ``gt_dir`` with a non-folder layout,
            invalid ``max_pixels``.
        FileNotFoundError: an expected directory or split list is missing (the message names it).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}{did_you_mean(layout, LAYOUTS)}; valid layouts: "
                         f"{', '.join(LAYOUTS)}")
    if gt_dir is not None and layout != "folder":
        raise ValueError(f"gt_dir only applies to layout 'folder'; layout {layout!r} has fixed ground-truth paths")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder/list name such as 'val', got {split!r}")
    check_max_pixels(max_pixels)
    name = _resolve_dataset(layout, dataset)
    top = Path(root).expanduser()
    gt_top = Path(gt_dir).expanduser() if gt_dir is not None else None
    forget_resolved_folders()
    base, candidates = list_layout(layout, top, split, gt_top, follow_symlinks)
    if not follow_symlinks:
        roots = (top.resolve(), base.resolve())
        gt_roots = (gt_top.resolve(),) if gt_top is not None else roots
        candidates = [confine(c, roots, gt_roots) for c in candidates]
    candidates.sort(key=lambda c: c.rel_path)
    known = {r.abs_path: r for r in previous}
    rows = [_row(name, c, known, max_pixels)
            for c in tqdm(candidates, desc=f"ingest {name}", unit="img", disable=not progress or not _terminal())]
    n_bad = sum(r.status != "ok" for r in rows)
    if n_bad:
        log.warning("ingest %s (%s): %d of %d images have errors", name, layout, n_bad, len(rows))
    n_outside = sum(FOLLOW_FIX in r.error for r in rows)
    if n_outside:
        log.warning("ingest %s: %d files or folders lie outside the dataset root %s and were refused; set "
                    "follow_symlinks: true in the dataset entry if those links are intended", name, n_outside, top)
    return rows


def ingest_files(paths: Sequence[str | PathLike[str]], dataset: str = "files", *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[ManifestRow]:
    """Manifest rows for individual image files (no ground truth), e.g. ``ovseg segment IMAGE``.

    The relative path of each row is the file name, so the image id depends on the file's
    bytes and name, not on the folder it sits in. ``max_pixels`` as for :func:`ingest`.
    """
    check_max_pixels(max_pixels)
    name = _resolve_dataset("folder", dataset)
    forget_resolved_folders()
    rows = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        rows.append(_row(name, Candidate(path, path.name, None), max_pixels=max_pixels))
    return rows
