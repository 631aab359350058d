"""A dataset without images, or whose root is wrong, is a usage error that says what exists instead."""

from __future__ import annotations

from pathlib import Path

from ovseg_core.names import did_you_mean
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


def root_error(name: str, root: str | Path, index: int, err: Exception) -> FileNotFoundError:
    """The error for dataset ``name`` (``datasets[index]``) whose root does not hold what its layout expects.

    ``err`` is the layout's message (what it expected); the error adds the dataset, the key to
    fix and what exists: the root's entries, or when the root is missing its parent's entries
    with the closest name.
    """
    path = Path(root)
    if path.is_dir():
        what = describe_folder(path)
    else:
        what = f"{path} does not exist"
        if path.parent.is_dir():
            entries = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
            what += f"{did_you_mean(path.name, entries)}; {describe_folder(path.parent)}"
    return FileNotFoundError(f"dataset {name!r} (datasets[{index}].root = {root}): {err}; {what}. "
                             f"Fix datasets[{index}].root in the experiment file, or pass --set datasets.{index}.root=PATH")
