"""Vocabularies: classes with synonyms, from class files or the command line (pure strings, no torch).

Both reference codes (methods.md §1): every synonym of every class is its own text query; a
class's score is the max over its queries (``Vocabulary.query_to_class``). The embeddings of
the queries: ``ovseg_core.features.text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Vocabulary", "parse_class_lines", "parse_vocabulary_string"]


@dataclass(frozen=True)
class Vocabulary:
    """Classes, each a tuple of one or more synonyms; each synonym is one text query."""

    classes: tuple[tuple[str, ...], ...]  # classes[c] = synonyms of class c; the first names the class

    def __post_init__(self) -> None:
        if not isinstance(self.classes, tuple) or len(self.classes) == 0:
            raise ValueError("Vocabulary.classes must be a non-empty tuple of synonym tuples")
        for c, synonyms in enumerate(self.classes):
            if not isinstance(synonyms, tuple) or len(synonyms) == 0:
                raise ValueError(f"Vocabulary.classes[{c}] must be a non-empty tuple of names, got {synonyms!r}")
            for name in synonyms:
                # Outer spaces are allowed: the reference class files keep them (PC60 "wood ").
                if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
                    raise ValueError(
                        f"Vocabulary.classes[{c}] has a bad name {name!r}: names are non-blank, on one line"
                    )

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """``(C,)`` display name of each class (its first synonym, outer spaces removed)."""
        return tuple(synonyms[0].strip() for synonyms in self.classes)

    @property
    def queries(self) -> tuple[str, ...]:
        """``(Q,)`` all synonyms, class by class, in order, exactly as written."""
        return tuple(name for synonyms in self.classes for name in synonyms)

    @property
    def query_to_class(self) -> np.ndarray:
        """``(Q,) int64``: the class index of each query."""
        counts = [len(synonyms) for synonyms in self.classes]
        return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def _split_synonyms(text: str, where: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if any(not name for name in names):
        raise ValueError(f"{where}: empty class name in {text!r}; separate synonyms with single commas")
    return names


def parse_class_lines(lines: Sequence[str], separator: str = ", ") -> Vocabulary:
    """One class per line, synonyms separated by ``separator``: the reference ``get_cls_idx``.

    Both reference codes split each line on one literal separator, each part a query, and
    remove only the newline: ``", "`` for SC-CLIP's files, ``"; "`` for CorrCLIP's
    (``ovseg_core.datasets.CLASS_SEPARATORS``). Nothing else is split or stripped, so with
    ``", "`` a ``"; "``-separated line is one query and ``"a,b"`` is one query; spaces around
    names are kept. Trailing blank lines are ignored; a blank line before the last class is an
    error (it would shift every later class index).

    Args:
        lines: class lines (e.g. ``ovseg_core.datasets.class_lines``), newline characters allowed
            at the end of each.
        separator: the synonym separator, a non-empty string without line breaks.
    Returns:
        the vocabulary; ``queries`` in file order, ``query_to_class`` the line index of each.
    """
    if isinstance(lines, str):
        raise ValueError("lines must be a sequence of lines, not one string; use text.splitlines()")
    if not isinstance(separator, str) or not separator or "\n" in separator:
        raise ValueError(f"separator must be a non-empty string without line breaks, got {separator!r}")
    kept = [line.rstrip("\r\n") for line in lines]
    while kept and not kept[-1].strip():
        kept.pop()
    if not kept:
        raise ValueError("no classes: the class lines are empty")
    classes = []
    for number, line in enumerate(kept, start=1):
        if not line.strip():
            raise ValueError(f"line {number} is blank; every line before the last class must name a class")
        names = tuple(line.split(separator))
        if any(not name.strip() for name in names):
            raise ValueError(f"line {number}: empty class name in {line!r}; synonyms are separated by {separator!r}")
        classes.append(names)
    return Vocabulary(classes=tuple(classes))


def parse_vocabulary_string(text: str) -> Vocabulary:
    """Command-line form: ``';'`` separates classes, ``','`` synonyms (``"cat; dog, puppy; grass"``)."""
    parts = text.split(";")
    if parts and not parts[-1].strip():
        parts.pop()
    if not parts:
        raise ValueError(f"no classes in vocabulary string {text!r}; e.g. 'cat; dog, puppy; grass'")
    classes = []
    for number, part in enumerate(parts, start=1):
        if not part.strip():
            raise ValueError(f"class {number} of {text!r} is empty; separate classes with single ';'")
        classes.append(_split_synonyms(part, f"class {number}"))
    return Vocabulary(classes=tuple(classes))
