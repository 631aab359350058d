"""Dataset ingestion: list the image / ground-truth pairs of an on-disk benchmark layout.

Layouts are the MMSegmentation on-disk layouts the full benchmarks use (``root`` may point at
the folder named below or at a parent that contains it):

=================  ==============================================================================
``voc``            ``VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``,
                   ids from ``ImageSets/Segmentation/<split>.txt``
``pascal_context`` ``VOCdevkit/VOC2010``: ``JPEGImages/<id>.jpg``, ``SegmentationClassContext/<id>.png``,
                   ids from ``ImageSets/SegmentationContext/<split>.txt``
``coco_stuff``     ``coco_stuff164k``: ``images/<split>2017/*.jpg``,
``coco_object``    ``annotations/<split>2017/<stem>_labelTrainIds.png`` (COCO-Object conversion happens
                   in ``ovseg_core.metrics.convert_labels``)
``ade20k``         ``ADEChallengeData2016``: ``images/validation/*.jpg``, ``annotations/validation/<stem>.png``
``cityscapes``     ``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png``,
                   ``gtFine/<split>/<city>/<x>_gtFine_labelTrainIds.png``
``camvid``         ``<split>/*.png``, ``<split>annot/<stem>.png``
``folder``         any images (:data:`IMAGE_EXTENSIONS`) under ``root``, recursively (hidden names
                   skipped); optional ``gt_dir`` matched by relative path without extension.
                   Files with an image-like extension ovseg cannot use (:data:`UNUSABLE_EXTENSIONS`:
                   SVG, HEIC, icons, camera raw, ...) are listed as error rows saying what to do
=================  ==============================================================================

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

from tqdm import tqdm

from ovseg_core.datasets import DATASETS
from storage.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UNUSABLE_EXTENSIONS, ImageError, check_max_pixels
from storage.images import content_hash, load_label, load_rgb

__all__ = ["DEFAULT_DATASET", "IMAGE_EXTENSIONS", "LAYOUTS", "UNUSABLE_EXTENSIONS", "ManifestRow", "image_id_for",
           "ingest", "ingest_files"]

log = logging.getLogger(__name__)

LAYOUTS = ("folder", "voc", "pascal_context", "coco_object", "coco_stuff", "ade20k", "cityscapes", "camvid")
DEFAULT_DATASET = {
    "folder": "custom",
    "voc": "VOC21",
    "pascal_context": "PC60",
    "coco_object": "COCO-Object",
    "coco_stuff": "COCO-Stuff",
    "ade20k": "ADE20K",
    "cityscapes": "Cityscapes",
    "camvid": "CamVid",
}
_COMPATIBLE = {
    "voc": ("VOC21", "VOC20"),
    "pascal_context": ("PC60", "PC59"),
    "coco_object": ("COCO-Object",),
    "coco_stuff": ("COCO-Stuff",),
    "ade20k": ("ADE20K",),
    "cityscapes": ("Cityscapes",),
    "camvid": ("CamVid",),
}
_GT_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
_FOLLOW_FIX = ("ovseg reads nothing outside the dataset root by default (symbolic links, '..' or absolute split-list "
               "entries); copy the file into the root or fix the entry, or set follow_symlinks: true in the dataset "
               "entry if the link is intended")


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


@dataclass(frozen=True)
class _Candidate:
    image: Path
    rel_path: str
    gt: Path | None  # expected ground truth (may not exist)
    error: str = ""  # decided while listing (unusable format, path outside the root): the file is not read


def _safe_stem(rel_path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(rel_path).stem).strip("_")
    return stem[:64] or "img"


def image_id_for(content_sha256: str, rel_path: str) -> str:
    """Stable, key-safe image id from the content hash and the relative path."""
    digest = hashlib.sha256((content_sha256 + rel_path).encode("utf-8")).hexdigest()[:12]
    return f"{_safe_stem(rel_path)}-{digest}"


def _find_base(root: Path, subdirs: tuple[str, ...], marker: str, layout: str) -> Path:
    """First of ``root / sub`` that contains the directory ``marker``."""
    tried = []
    for sub in subdirs:
        base = root / sub if sub else root
        if (base / marker).is_dir():
            return base
        tried.append(str(base / marker))
    raise FileNotFoundError(f"layout {layout!r}: expected the directory {' or '.join(tried)}; check root={root}")


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"layout {layout!r}: expected the directory {path}")
    return path


def _split_ids(list_file: Path, layout: str) -> list[str]:
    if not list_file.is_file():
        raise FileNotFoundError(f"layout {layout!r}: expected the split list {list_file}")
    return [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]


def _rel(path: Path, base: Path) -> str:
    """POSIX path relative to ``base``; an absolute path outside it (absolute split entry) as is."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _real(path: Path) -> Path | None:
    """The path with every link and ``..`` resolved; None when that fails (link loop, bad name)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _abs(path: Path) -> str:
    real = _real(path)
    return str(real if real is not None else path.absolute())


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = _real(path)
    return real is not None and any(real.is_relative_to(r) for r in roots)


_Listing = tuple[Path, list[_Candidate]]  # (layout base folder, candidates)


def _voc_like(root: Path, split: str, layout: str, year: str, gt_folder: str, sets: str) -> _Listing:
    base = _find_base(root, ("", f"VOC{year}", f"VOCdevkit/VOC{year}"), "JPEGImages", layout)
    ids = _split_ids(base / "ImageSets" / sets / f"{split}.txt", layout)
    return base, [
        _Candidate(img, _rel(img, base), base / gt_folder / f"{i}.png")
        for i in ids
        for img in [base / "JPEGImages" / f"{i}.jpg"]
    ]


def _voc(root: Path, split: str) -> _Listing:
    return _voc_like(root, split, "voc", "2012", "SegmentationClass", "Segmentation")


def _pascal_context(root: Path, split: str) -> _Listing:
    return _voc_like(root, split, "pascal_context", "2010", "SegmentationClassContext", "SegmentationContext")


def _coco(root: Path, split: str, layout: str) -> _Listing:
    base = _find_base(root, ("", "coco_stuff164k"), "images", layout)
    s = split if split.endswith("2017") else f"{split}2017"
    img_dir = _require_dir(base / "images" / s, layout)
    ann_dir = _require_dir(base / "annotations" / s, layout)
    return base, [_Candidate(p, _rel(p, base), ann_dir / f"{p.stem}_labelTrainIds.png") for p in img_dir.glob("*.jpg")]


def _ade20k(root: Path, split: str) -> _Listing:
    base = _find_base(root, ("", "ADEChallengeData2016"), "images", "ade20k")
    s = {"val": "validation", "train": "training"}.get(split, split)
    img_dir = _require_dir(base / "images" / s, "ade20k")
    ann_dir = _require_dir(base / "annotations" / s, "ade20k")
    return base, [_Candidate(p, _rel(p, base), ann_dir / f"{p.stem}.png") for p in img_dir.glob("*.jpg")]


def _cityscapes(root: Path, split: str) -> _Listing:
    base = _find_base(root, ("", "cityscapes"), "leftImg8bit", "cityscapes")
    img_dir = _require_dir(base / "leftImg8bit" / split, "cityscapes")
    gt_dir = _require_dir(base / "gtFine" / split, "cityscapes")
    suffix = "_leftImg8bit"
    out = []
    for p in img_dir.glob(f"*/*{suffix}.png"):
        prefix = p.stem[: -len(suffix)]
        out.append(_Candidate(p, _rel(p, base), gt_dir / p.parent.name / f"{prefix}_gtFine_labelTrainIds.png"))
    return base, out


def _camvid(root: Path, split: str) -> _Listing:
    base = _find_base(root, ("", "CamVid", "camvid"), split, "camvid")
    ann_dir = _require_dir(base / f"{split}annot", "camvid")
    return base, [_Candidate(p, _rel(p, base), ann_dir / p.name) for p in (base / split).glob("*.png")]


def _dir_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _folder(root: Path, gt_dir: Path | None, follow_symlinks: bool) -> _Listing:
    """Walk ``root`` (hidden names skipped); image-like files become candidates (see module doc)."""
    _require_dir(root, "folder")
    root_real = root.resolve()
    gt_root = gt_dir.resolve() if gt_dir is not None else None
    if gt_root is not None:
        _require_dir(gt_root, "folder")
    out: list[_Candidate] = []
    seen = {_dir_id(root)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            out.append(_Candidate(folder, _rel(folder, root), None, f"{folder}: cannot list this folder ({e}); "
                                                                    "fix its permissions or remove it"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            rel = _rel(p, root)
            if entry.is_dir():
                if entry.is_symlink():
                    if _inside(p, (root_real,)):
                        continue  # its files are listed at their real path inside the root
                    if not follow_symlinks:
                        out.append(_Candidate(p, rel, None, f"{p}: linked folder resolves to {_abs(p)}, outside "
                                                            f"the dataset root {root_real}; {_FOLLOW_FIX}"))
                        continue
                ident = _dir_id(p)
                if ident not in seen:  # each real folder once: link cycles end
                    seen.add(ident)
                    stack.append(p)
                continue
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTENSIONS and ext not in UNUSABLE_EXTENSIONS:
                continue
            if not entry.is_file() and not entry.is_symlink():  # fifo, socket, ...
                continue
            if gt_root is not None and _inside(p, (gt_root,)):
                continue
            gt = None
            if gt_root is not None:
                stem_rel = Path(rel).with_suffix("")
                matches = [gt_root / stem_rel.with_suffix(e) for e in _GT_EXTENSIONS]
                gt = next((m for m in matches if m.is_file()), matches[0])
            error = f"{p}: {UNUSABLE_EXTENSIONS[ext]}, or remove it from the folder" if ext in UNUSABLE_EXTENSIONS else ""
            out.append(_Candidate(p, rel, gt if not error else None, error))
    return root, out


def _confine(c: _Candidate, roots: Sequence[Path], gt_roots: Sequence[Path]) -> _Candidate:
    """The candidate, or an error candidate when its image or ground truth resolves outside the roots."""
    if c.error:
        return c
    for kind, path, allowed in (("image", c.image, roots), ("ground truth", c.gt, gt_roots)):
        if path is None or _inside(path, allowed):
            continue
        real = _real(path)
        where = f"resolves to {real}" if real is not None else "cannot be resolved (link loop or invalid name)"
        return replace(c, error=f"{path}: {kind} {where}, outside the dataset root {allowed[0]}; {_FOLLOW_FIX}")
    return c


def _file_stat(c: _Candidate) -> str:
    """``size:mtime_ns`` of the image and of its ground truth ("" when a file is missing)."""
    parts = []
    for p in (c.image, c.gt):
        try:
            st = p.stat() if p is not None else None
        except (OSError, ValueError):
            return ""
        parts.append(f"{st.st_size}:{st.st_mtime_ns}" if st is not None else "-")
    return "|".join(parts)


def _reusable(old: ManifestRow | None, dataset: str, c: _Candidate, stat: str, max_pixels: int | None) -> bool:
    return (
        old is not None and old.status == "ok" and bool(stat) and old.file_stat == stat and old.rel_path == c.rel_path
        and old.gt_path == (_abs(c.gt) if c.gt is not None else "") and old.dataset == dataset
        and (max_pixels is None or old.width * old.height <= max_pixels)
    )


def _row(dataset: str, c: _Candidate, previous: Mapping[str, ManifestRow] | None = None,
         max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ManifestRow:
    """Decode one candidate into a manifest row; failures become an error row.

    A row of ``previous`` (keyed by absolute image path) is reused without reading the files
    when it is ``ok``, within ``max_pixels`` and the image and ground-truth sizes and mtimes are
    unchanged. A candidate refused while listing gives an error row without reading its file.
    """
    gt_path = _abs(c.gt) if c.gt is not None else ""
    if c.error:
        return ManifestRow(dataset=dataset, image_id=image_id_for("", c.rel_path), rel_path=c.rel_path,
                           abs_path=_abs(c.image), gt_path=gt_path, width=0, height=0, content_sha256="",
                           status="error", error=c.error, file_stat="")
    stat = _file_stat(c)
    old = previous.get(_abs(c.image)) if previous else None
    if _reusable(old, dataset, c, stat, max_pixels):
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
        abs_path=_abs(c.image),
        gt_path=gt_path,
        width=int(width),
        height=int(height),
        content_sha256=sha,
        status="error" if error else "ok",
        error=error,
        file_stat=stat,
    )


def _resolve_dataset(layout: str, dataset: str | None) -> str:
    if dataset is None:
        return DEFAULT_DATASET[layout]
    if layout == "folder":
        if not dataset or "/" in dataset or dataset.startswith("."):
            raise ValueError(f"dataset name {dataset!r} must be non-empty, without '/', not starting with '.'")
        return dataset
    by_lower = {k.lower(): k for k in DATASETS}
    name = by_lower.get(dataset.lower(), dataset)
    if name not in _COMPATIBLE[layout]:
        raise ValueError(f"layout {layout!r} feeds datasets {_COMPATIBLE[layout]}, got dataset={dataset!r}")
    return name


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
        layout: one of :data:`LAYOUTS`.
        dataset: DatasetSpec name the images feed (default per layout, see
            :data:`DEFAULT_DATASET`; VOC may feed VOC20, Pascal Context PC59); any key-safe
            name for ``"folder"``.
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
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if gt_dir is not None and layout != "folder":
        raise ValueError(f"gt_dir only applies to layout 'folder'; layout {layout!r} has fixed ground-truth paths")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain folder/list name such as 'val', got {split!r}")
    check_max_pixels(max_pixels)
    name = _resolve_dataset(layout, dataset)
    top = Path(root).expanduser()
    gt_top = Path(gt_dir).expanduser() if gt_dir is not None else None
    listers: dict[str, Callable[[], _Listing]] = {
        "folder": lambda: _folder(top, gt_top, follow_symlinks),
        "voc": lambda: _voc(top, split),
        "pascal_context": lambda: _pascal_context(top, split),
        "coco_object": lambda: _coco(top, split, "coco_object"),
        "coco_stuff": lambda: _coco(top, split, "coco_stuff"),
        "ade20k": lambda: _ade20k(top, split),
        "cityscapes": lambda: _cityscapes(top, split),
        "camvid": lambda: _camvid(top, split),
    }
    base, candidates = listers[layout]()
    if not follow_symlinks:
        roots = (top.resolve(), base.resolve())
        gt_roots = (gt_top.resolve(),) if gt_top is not None else roots
        candidates = [_confine(c, roots, gt_roots) for c in candidates]
    candidates.sort(key=lambda c: c.rel_path)
    known = {r.abs_path: r for r in previous}
    rows = [_row(name, c, known, max_pixels)
            for c in tqdm(candidates, desc=f"ingest {name}", unit="img", disable=not progress)]
    n_bad = sum(r.status != "ok" for r in rows)
    if n_bad:
        log.warning("ingest %s (%s): %d of %d images have errors", name, layout, n_bad, len(rows))
    n_outside = sum(_FOLLOW_FIX in r.error for r in rows)
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
    rows = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image {path} not found")
        rows.append(_row(name, _Candidate(path, path.name, None), max_pixels=max_pixels))
    return rows
