"""Stage keys: content addresses of stage outputs.

A stage key is the hash of everything that determines a stage's output for any image:

    key = sha256(canonical_json({
        "stage": name,                 # e.g. "dino_features"
        "params": {...},               # the stage's resolved parameters
        "upstream": {name: key, ...},  # keys of the upstream stage outputs it reads
        "code_version": "3",           # explicit per-stage code version string
        "weights": {...} | None,       # identity of the model weights used
    }))[:20]

The input image enters through the address, not the key: an output lives at
``(stage, key, image_id)`` and an image id contains the hash of the image's bytes. Keys
chain through ``upstream``, so a change upstream changes every downstream key and nothing
else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePath
from typing import Any

from ovseg_core.options import KEY_OMIT_DEFAULT

KEY_LENGTH = 20


def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, tuples, enums, paths and numpy scalars to plain JSON types.

    Floats that are integral stay floats (``1.0`` and ``1`` hash differently on purpose: a
    parameter's type is part of what was run). NaN and infinities are rejected because JSON
    cannot represent them canonically.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not _omitted_at_default(value, f)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"parameter names must be strings, got {k!r}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, Enum):
        return to_jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"parameter value {value!r} is not finite; stage keys need finite numbers")
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return to_jsonable(value.item())
    raise TypeError(f"cannot hash parameter value of type {type(value).__name__}: {value!r}")


def _omitted_at_default(value: Any, f: dataclasses.Field) -> bool:
    """A field declared with ``ovseg_core.options.later_option`` that holds its default is not hashed:
    an option added to a config later never moves the keys of configurations that do not use it."""
    return bool(f.metadata.get(KEY_OMIT_DEFAULT)) and getattr(value, f.name) == f.default


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, plain types only."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StageKey:
    """The identity of one stage's outputs (for all images).

    Attributes:
        stage: stage name.
        params: resolved parameters (JSON-able).
        upstream: ``{upstream stage name: its key}``.
        code_version: explicit code version string of the stage implementation.
        weights: identities of the model weights used (JSON-able), or None.
    """

    stage: str
    params: Mapping[str, Any] = field(default_factory=dict)
    upstream: Mapping[str, str] = field(default_factory=dict)
    code_version: str = "1"
    weights: Mapping[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        """The JSON-able record that is hashed (also stored in the stage group's attrs)."""
        return {
            "stage": self.stage,
            "params": to_jsonable(self.params),
            "upstream": dict(sorted(self.upstream.items())),
            "code_version": self.code_version,
            "weights": to_jsonable(self.weights),
        }

    @property
    def key(self) -> str:
        """Hex digest prefix of the canonical payload."""
        return hashlib.sha256(canonical_json(self.payload()).encode()).hexdigest()[:KEY_LENGTH]

    @property
    def is_random_weights(self) -> bool:
        """True when any model identity says its weights are random."""
        return _mentions_random(self.weights)


def _mentions_random(w: Any) -> bool:
    if isinstance(w, Mapping):
        if w.get("random") is True:
            return True
        return any(_mentions_random(v) for v in w.values())
    if isinstance(w, (list, tuple)):
        return any(_mentions_random(v) for v in w)
    return False
