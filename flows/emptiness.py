"""A dataset without images is a usage error that says what its root holds instead."""

from __future__ import annotations

from pathlib import Path

from storage.images import IMAGE_EXTENSIONS

SHOWN = 12  # entries of the root listed in the message


class EmptyDatasetError(ValueError):
    """A dataset's root (with its layout and split) yields no image; the CLI exits 2."""


def describe_folder(root: str | Path) -> str:
    """What a folder holds, for an error message: up to ``SHOWN`` entries (folders end with ``/``)."""
    path = Path(root)
    if path.is_file():
        return f"{path} is a file"
    if not path.is_dir():
        return f"{path} does not exist"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        return f"{path} is empty"
    more = f", ... ({len(entries)} entries)" if len(entries) > SHOWN else ""
    return f"{path} holds: {', '.join(entries[:SHOWN])}{more}"


def empty_dataset_error(name: str, root: str | Path, layout: str) -> EmptyDatasetError:
    """The error for dataset ``name`` whose root gave no image under ``layout``."""
    hint = (f"the folder layout takes files ending in {' '.join(sorted(IMAGE_EXTENSIONS))}, searched recursively"
            if layout == "folder" else f"check the root, the split and that layout {layout!r} matches the folder")
    return EmptyDatasetError(f"dataset {name!r}: no images found under {root} (layout {layout!r}); "
                             f"{describe_folder(root)}; {hint}")
