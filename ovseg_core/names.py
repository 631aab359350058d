"""Did-you-mean suggestions for misspelt names (config keys, method / dataset / backbone names).

Pure string matching with :mod:`difflib`; comparison ignores case, the suggestion keeps the
spelling of the valid name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["closest_name", "did_you_mean"]

# Minimum difflib similarity ratio (0..1) for a suggestion; difflib's own default.
DEFAULT_CUTOFF = 0.6


def closest_name(name: object, choices: Iterable[object], cutoff: float = DEFAULT_CUTOFF) -> str | None:
    """The valid name most similar to ``name``, or None when none is close enough.

    Args:
        name: the unknown name (converted with ``str``).
        choices: the valid names (converted with ``str``; duplicates and order do not matter
            except that ties go to the first).
        cutoff: minimum :class:`difflib.SequenceMatcher` ratio in ``[0, 1]`` on lower-cased text.
    Returns:
        the valid name as spelled in ``choices``; None when ``name`` is itself valid (exactly),
        ``choices`` is empty, or nothing reaches ``cutoff``.
    """
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"cutoff must be in [0, 1], got {cutoff!r}")
    text = str(name)
    valid = list(dict.fromkeys(str(c) for c in choices))
    if text in valid:
        return None
    by_lower: dict[str, str] = {}
    for choice in valid:
        by_lower.setdefault(choice.lower(), choice)
    if text.lower() in by_lower:
        return by_lower[text.lower()]
    best = difflib.get_close_matches(text.lower(), list(by_lower), n=1, cutoff=cutoff)
    return by_lower[best[0]] if best else None


def did_you_mean(name: object, choices: Iterable[object], cutoff: float = DEFAULT_CUTOFF) -> str:
    """``" (did you mean 'tau'?)"`` for the closest valid name, or ``""`` when there is none.

    Meant to be appended to an error message: ``f"unknown key {key!r}{did_you_mean(key, fields)}"``.
    See :func:`closest_name` for the matching rule.
    """
    best = closest_name(name, choices, cutoff)
    return f" (did you mean {best!r}?)" if best is not None else ""
