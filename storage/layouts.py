"""Dataset layouts: which image and ground-truth files a dataset folder holds (no file is decoded here).

``LAYOUTS`` is the only table of layouts (one ``Layout`` entry each: what it reads, the dataset
specs it feeds, its lister); the CLI's choices, the experiment file's ``layout`` values and
``storage.ingest`` read it. ``list_layout`` returns the layout's base folder and one
``Candidate`` per image: its path, its path relative to the base folder, its expected ground
truth, and an error already decided while listing (an unusable format; ``confine`` adds paths
that resolve outside the dataset root). ``root`` may point at the folder a layout names or at a
parent that contains it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from storage.images import IMAGE_EXTENSIONS, UNUSABLE_EXTENSIONS

_GT_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
FOLLOW_FIX = ("ovseg reads nothing outside the dataset root by default (symbolic links, '..' or absolute split-list "
               "entries); copy the file into the root or fix the entry, or set follow_symlinks: true in the dataset "
               "entry if the link is intended")


@dataclass(frozen=True)
class Candidate:
    image: Path
    rel_path: str
    gt: Path | None  # expected ground truth (may not exist)
    error: str = ""  # decided while listing (unusable format, path outside the root): the file is not read


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


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return None


@functools.lru_cache(maxsize=8192)
def _real_folder(folder: Path) -> Path | None:
    return _resolve(folder)


def forget_resolved_folders() -> None:
    """Drop the cached real paths of folders (each ingest starts with this: links may have changed)."""
    _real_folder.cache_clear()


def _real(path: Path) -> Path | None:
    """The path with every link and ``..`` resolved; None when that fails (link loop, bad name).

    The containing folder's real path is cached (see :func:`forget_resolved_folders`), so a
    file costs one ``lstat`` instead of one per path component: a 100k-image corpus is listed
    and confined in seconds.
    """
    if path.name in ("", ".", ".."):
        return _resolve(path)
    folder = _real_folder(path.parent)
    if folder is None:
        return None
    real = folder / path.name
    try:
        linked = real.is_symlink()
    except (OSError, ValueError):
        return None
    return _resolve(real) if linked else real


def abs_path(path: Path) -> str:
    real = _real(path)
    return str(real if real is not None else path.absolute())


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    real = _real(path)
    return real is not None and any(real.is_relative_to(r) for r in roots)


_Listing = tuple[Path, list[Candidate]]  # (layout base folder, candidates)


def _voc_like(root: Path, split: str, layout: str, year: str, gt_folder: str, sets: str) -> _Listing:
    base = _find_base(root, ("", f"VOC{year}", f"VOCdevkit/VOC{year}"), "JPEGImages", layout)
    ids = _split_ids(base / "ImageSets" / sets / f"{split}.txt", layout)
    return base, [
        Candidate(img, _rel(img, base), base / gt_folder / f"{i}.png")
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
    return base, [Candidate(p, _rel(p, base), ann_dir / f"{p.stem}_labelTrainIds.png") for p in img_dir.glob("*.jpg")]


# ADE20K-style layouts: <dataset folder>/<images>/<split>/*.jpg beside <annotations>/<split>/<stem><ext>, the split
# named "validation" / "training" ("val" / "train" accepted). layout -> (dataset folder, images, annotations, ext)
_ADE_LIKE: dict[str, tuple[str, str, str, str]] = {
    "ade20k": ("ADEChallengeData2016", "images", "annotations", ".png"),
    # CAT-Seg's ADE20K-full layout (CorrCLIPv2's ADE-847): 16-bit .tif labels beside detectron2 images
    "ade847": ("ADE20K_2021_17_01", "images_detectron2", "annotations_detectron2", ".tif"),
}


def _ade_like(root: Path, split: str, layout: str) -> _Listing:
    """The images and ground truth of an ADE20K-style layout (``_ADE_LIKE``)."""
    folder, images, annotations, gt_ext = _ADE_LIKE[layout]
    base = _find_base(root, ("", folder), images, layout)
    s = {"val": "validation", "train": "training"}.get(split, split)
    img_dir = _require_dir(base / images / s, layout)
    ann_dir = _require_dir(base / annotations / s, layout)
    return base, [Candidate(p, _rel(p, base), ann_dir / f"{p.stem}{gt_ext}") for p in img_dir.glob("*.jpg")]


def _pc459(root: Path, split: str) -> _Listing:
    """VOC2010 images and split list with CAT-Seg's PASCAL Context-459 labels (``annotations_detectron2/pc459_<split>``)."""
    base = _find_base(root, ("", "VOC2010", "VOCdevkit/VOC2010"), "JPEGImages", "pc459")
    ids = _split_ids(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", "pc459")
    ann_dir = base / "annotations_detectron2" / f"pc459_{split}"
    return base, [Candidate(base / "JPEGImages" / f"{i}.jpg", _rel(base / "JPEGImages" / f"{i}.jpg", base),
                            ann_dir / f"{i}.tif") for i in ids]


def _cityscapes(root: Path, split: str) -> _Listing:
    base = _find_base(root, ("", "cityscapes"), "leftImg8bit", "cityscapes")
    img_dir = _require_dir(base / "leftImg8bit" / split, "cityscapes")
    gt_dir = _require_dir(base / "gtFine" / split, "cityscapes")
    suffix = "_leftImg8bit"
    out = []
    for p in img_dir.glob(f"*/*{suffix}.png"):
        prefix = p.stem[: -len(suffix)]
        out.append(Candidate(p, _rel(p, base), gt_dir / p.parent.name / f"{prefix}_gtFine_labelTrainIds.png"))
    return base, out


def _camvid(root: Path, split: str) -> _Listing:
    base = _find_base(root, ("", "CamVid", "camvid"), split, "camvid")
    ann_dir = _require_dir(base / f"{split}annot", "camvid")
    return base, [Candidate(p, _rel(p, base), ann_dir / p.name) for p in (base / split).glob("*.png")]


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
    # Ground-truth files met while walking are skipped; a real (unlinked) file can only be one when
    # the ground-truth folder lies inside the root or linked folders are followed.
    gt_may_be_inside = gt_root is not None and (follow_symlinks or gt_root.is_relative_to(root_real))
    out: list[Candidate] = []
    seen = {_dir_id(root)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            out.append(Candidate(folder, _rel(folder, root), None, f"{folder}: cannot list this folder ({e}); "
                                                                    "fix its permissions or remove it"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = Path(entry.path)
            rel = _rel(p, root)
            try:
                is_dir = entry.is_dir()
            except OSError as e:  # a link loop (ELOOP), a name too long ...: that entry's error row, not the run's
                if not p.suffix or p.suffix.lower() in IMAGE_EXTENSIONS or p.suffix.lower() in UNUSABLE_EXTENSIONS:
                    out.append(Candidate(p, rel, None, f"{p}: cannot tell whether it is a file or a folder ({e}); "
                                                        "fix or remove this link"))
                continue
            if is_dir:
                if entry.is_symlink():
                    if _inside(p, (root_real,)):
                        continue  # its files are listed at their real path inside the root
                    if not follow_symlinks:
                        out.append(Candidate(p, rel, None, f"{p}: linked folder resolves to {abs_path(p)}, outside "
                                                            f"the dataset root {root_real}; {FOLLOW_FIX}"))
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
            if gt_root is not None and (gt_may_be_inside or entry.is_symlink()) and _inside(p, (gt_root,)):
                continue
            gt = None
            if gt_root is not None:
                stem_rel = Path(rel).with_suffix("")
                matches = [gt_root / stem_rel.with_suffix(e) for e in _GT_EXTENSIONS]
                gt = next((m for m in matches if m.is_file()), matches[0])
            error = f"{p}: {UNUSABLE_EXTENSIONS[ext]}, or remove it from the folder" if ext in UNUSABLE_EXTENSIONS else ""
            out.append(Candidate(p, rel, gt if not error else None, error))
    return root, out


def confine(c: Candidate, roots: Sequence[Path], gt_roots: Sequence[Path]) -> Candidate:
    """The candidate, or an error candidate when its image or ground truth resolves outside the roots."""
    if c.error:
        return c
    for kind, path, allowed in (("image", c.image, roots), ("ground truth", c.gt, gt_roots)):
        if path is None or _inside(path, allowed):
            continue
        real = _real(path)
        where = f"resolves to {real}" if real is not None else "cannot be resolved (link loop or invalid name)"
        return replace(c, error=f"{path}: {kind} {where}, outside the dataset root {allowed[0]}; {FOLLOW_FIX}")
    return c


@dataclass(frozen=True)
class Layout:
    """One on-disk dataset layout.

    Attributes:
        name: the ``layout`` of an experiment's dataset entry and of ``ovseg ingest --layout``.
        reads: the folders and files it reads (documentation: ``--help`` and docs).
        datasets: the dataset specs its images feed, the default first (``folder``: any name, default "custom").
        lister: ``(root, split, gt_dir, follow_symlinks) -> (base folder, candidates)``.
    """

    name: str
    reads: str
    datasets: tuple[str, ...]
    lister: Callable[[Path, str, Path | None, bool], _Listing]


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    Layout("folder", "any images under root, recursively (hidden names skipped); optional gt_dir matched by "
           "relative path without extension; image-like files ovseg cannot use are error rows saying what to do",
           ("custom",), lambda top, split, gt, follow: _folder(top, gt, follow)),
    Layout("voc", "VOCdevkit/VOC2012: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ids from "
           "ImageSets/Segmentation/<split>.txt", ("VOC21", "VOC20"), lambda top, split, gt, follow: _voc(top, split)),
    Layout("pascal_context", "VOCdevkit/VOC2010: JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, ids from "
           "ImageSets/SegmentationContext/<split>.txt", ("PC60", "PC59"),
           lambda top, split, gt, follow: _pascal_context(top, split)),
    Layout("coco_object", "coco_stuff164k: images/<split>2017/*.jpg, annotations/<split>2017/<stem>_labelTrainIds.png "
           "(the COCO-Object conversion happens in ovseg_core.metrics.convert_labels)", ("COCO-Object",),
           lambda top, split, gt, follow: _coco(top, split, "coco_object")),
    Layout("coco_stuff", "coco_stuff164k: images/<split>2017/*.jpg, annotations/<split>2017/<stem>_labelTrainIds.png",
           ("COCO-Stuff",), lambda top, split, gt, follow: _coco(top, split, "coco_stuff")),
    Layout("ade20k", "ADEChallengeData2016: images/validation/*.jpg, annotations/validation/<stem>.png", ("ADE20K",),
           lambda top, split, gt, follow: _ade_like(top, split, "ade20k")),
    Layout("cityscapes", "leftImg8bit/<split>/<city>/<x>_leftImg8bit.png, "
           "gtFine/<split>/<city>/<x>_gtFine_labelTrainIds.png", ("Cityscapes",),
           lambda top, split, gt, follow: _cityscapes(top, split)),
    Layout("camvid", "<split>/*.png, <split>annot/<stem>.png", ("CamVid",),
           lambda top, split, gt, follow: _camvid(top, split)),
    Layout("ade847", "ADE20K_2021_17_01 (CAT-Seg): images_detectron2/validation/*.jpg, "
           "annotations_detectron2/validation/<stem>.tif (16-bit labels 0..846, unlabelled 65535)", ("ADE847",),
           lambda top, split, gt, follow: _ade_like(top, split, "ade847")),
    Layout("pc459", "VOCdevkit/VOC2010: JPEGImages/<id>.jpg, annotations_detectron2/pc459_<split>/<id>.tif "
           "(CAT-Seg, 16-bit labels 0..458, unlabelled 65535), ids from ImageSets/SegmentationContext/<split>.txt",
           ("PC459",), lambda top, split, gt, follow: _pc459(top, split)),
)}
LAYOUT_NAMES: tuple[str, ...] = tuple(LAYOUTS)


def list_layout(layout: str, top: Path, split: str, gt_top: Path | None, follow_symlinks: bool) -> _Listing:
    """(base folder, candidates) of a dataset folder in ``layout``."""
    return LAYOUTS[layout].lister(top, split, gt_top, follow_symlinks)

