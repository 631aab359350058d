"""Experiment files as raw mappings, before validation: YAML, ``extends`` chains, ``KEY=VALUE`` overrides, paths.

``flows.config`` validates what these functions produce into an ``Experiment``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

EXTENDS_KEY = "extends"  # top-level key: the file(s) this file builds on
DELETE_KEY = "_delete_"  # in a mapping of an extending file: replace the inherited mapping instead of merging
_RESERVED = (EXTENDS_KEY, "provenance")  # never set by overrides


class ExperimentError(ValueError):
    """The experiment file is invalid; the message names the file, the key and the fix."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _fix_path(value: Any, base: Path | None, url_ok: bool = False) -> Any:
    if not isinstance(value, str) or not value or (url_ok and "://" in value):
        return value
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if base is not None and not os.path.isabs(value):
        value = str((base / value).resolve())
    return value


def resolve_paths(data: Mapping[str, Any], base_dir: str | os.PathLike | None) -> dict[str, Any]:
    """A copy of a raw experiment mapping with its paths made usable.

    ``~`` is expanded in ``store``, ``models.weights_dir``, ``regions.params.dir``,
    ``datasets[*].root`` and ``datasets[*].gt_dir``; relative ones are then resolved against ``base_dir`` (left
    relative when it is None). Store URLs (``scheme://...``) and absolute paths are kept as
    written. Malformed parts are left for validation to report.
    """
    base = None if base_dir is None else Path(base_dir).expanduser()
    out = dict(data)
    if "store" in out:
        out["store"] = _fix_path(out["store"], base, url_ok=True)
    if isinstance(out.get("models"), Mapping) and "weights_dir" in out["models"]:
        out["models"] = dict(out["models"], weights_dir=_fix_path(out["models"]["weights_dir"], base))
    regions = out.get("regions")
    if isinstance(regions, Mapping) and isinstance(regions.get("params"), Mapping) and "dir" in regions["params"]:
        out["regions"] = dict(regions, params=dict(regions["params"], dir=_fix_path(regions["params"]["dir"], base)))
    if isinstance(out.get("datasets"), list):
        out["datasets"] = [
            {k: (_fix_path(v, base) if k in ("root", "gt_dir") else v) for k, v in d.items()} if isinstance(d, Mapping) else d
            for d in out["datasets"]
        ]
    if isinstance(out.get("banks"), list):  # banks[*].root and banks[*].regions.params.dir
        out["banks"] = [_bank_paths(b, base_dir) if isinstance(b, Mapping) else b for b in out["banks"]]
    return out


def _bank_paths(bank: Mapping[str, Any], base_dir: str | os.PathLike | None) -> dict[str, Any]:
    out = dict(bank)
    if "root" in out:
        out["root"] = _fix_path(out["root"], None if base_dir is None else Path(base_dir).expanduser())
    if isinstance(out.get("regions"), Mapping):
        out["regions"] = resolve_paths({"regions": out["regions"]}, base_dir)["regions"]
    imported = out.get("imported")
    if isinstance(imported, Mapping):
        base = None if base_dir is None else Path(base_dir).expanduser()
        out["imported"] = {k: ([_fix_path(p, base) for p in v] if k == "values" and isinstance(v, list)
                               else _fix_path(v, base) if k == "index" else v) for k, v in imported.items()}
    return out


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"methods.0.params.tau=3"`` -> ``(("methods", "0", "params", "tau"), 3)``; the value is YAML."""
    if not isinstance(text, str):
        raise ExperimentError(f"override {text!r}: expected a 'KEY=VALUE' string, e.g. methods.0.params.tau=3")
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ExperimentError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. methods.0.params.tau=3")
    parts = tuple(key.split("."))
    if not all(parts):
        raise ExperimentError(f"override {text!r}: empty part in key {key!r}; separate key parts with single dots")
    if parts[0] in _RESERVED:
        raise ExperimentError(f"override {text!r}: {parts[0]!r} cannot be overridden; edit the experiment file instead")
    if not raw.strip():
        raise ExperimentError(f"override {text!r}: no value after '='; write {key}=null for None or {key}='' for an empty string")
    try:
        value = _yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ExperimentError(f"override {text!r}: the value is not valid YAML ({problem}); quote a string, e.g. {key}='{raw}'") from None
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of a raw experiment mapping with ``KEY=VALUE`` overrides applied in order.

    Key parts are mapping keys or (in lists) 0-based indices; missing mapping keys (and None
    values on the way) become new mappings. Raises ``ExperimentError`` naming the override for
    a malformed override, an index out of range, or a path through a scalar.
    """
    if isinstance(overrides, str):
        raise ExperimentError(f"overrides must be a list of 'KEY=VALUE' strings, got one string {overrides!r}; wrap it in a list")
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth])
            last = depth == len(parts) - 1
            if isinstance(node, dict):
                slot: Any = part
            elif isinstance(node, list):
                if not part.isdigit():
                    raise ExperimentError(f"override {text!r}: {where} is a list; the part after it must be an index "
                                          f"0..{len(node) - 1}, got {part!r}")
                slot = int(part)
                if slot >= len(node):
                    have = f"has {len(node)} {'entry' if len(node) == 1 else 'entries'} (0..{len(node) - 1})" if node else "is empty"
                    raise ExperimentError(f"override {text!r}: index {slot} is out of range: {where} {have}; add the "
                                          f"entry in the experiment file or replace the whole list ({where}=[...])")
            else:
                raise ExperimentError(f"override {text!r}: {where} is a {type(node).__name__} ({node!r}), not a "
                                      f"mapping or a list; set it directly ({where}=...)")
            if last:
                node[slot] = value
            else:
                if (node.get(slot) if isinstance(node, dict) else node[slot]) is None:
                    node[slot] = {}
                node = node[slot]
    return out


def _merge(base: Any, child: Any, file: Path, key: str = "") -> Any:
    """``child`` over ``base``: mappings merged key by key (``_delete_: true`` replaces), all else replaced."""
    if isinstance(child, list):
        return [_merge(None, v, file, f"{key}.{i}") for i, v in enumerate(child)]
    if not isinstance(child, dict):
        return child
    child = dict(child)
    delete = child.pop(DELETE_KEY, False)
    if not isinstance(delete, bool):
        raise ExperimentError(f"invalid experiment {file}: {key.lstrip('.') or '(top level)'}.{DELETE_KEY} "
                              f"must be true or false, got {delete!r}")
    out = dict(base) if isinstance(base, dict) and not delete else {}
    for k, v in child.items():
        out[k] = _merge(out.get(k), v, file, f"{key}.{k}")
    return out


def _read_file(path: Path, stack: tuple[Path, ...], files: list[Path]) -> dict[str, Any]:
    """One file with its bases merged in; its own relative paths resolved against its folder."""
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack[stack.index(path):], path))
        raise ExperimentError(f"extends cycle: {cycle}; remove one of the extends entries")
    if not path.is_file():
        by = f" (extended by {stack[-1]})" if stack else ""
        raise ExperimentError(f"experiment file {path} not found{by}; see configs/ for examples")
    try:
        data = _yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ExperimentError(f"experiment file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ExperimentError(f"invalid experiment {path}: the top level must be a mapping, got {type(data).__name__}")
    if "provenance" in data:
        raise ExperimentError(f"invalid experiment {path}: provenance is recorded by ovseg; remove the key")
    files.append(path)
    bases = data.pop(EXTENDS_KEY, None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is not None and (not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases)):
        raise ExperimentError(f"invalid experiment {path}: extends must be a file path or a list of them, got {bases!r}")
    merged: Any = None
    for b in bases or []:
        base_path = Path(b).expanduser()
        base_path = (path.parent / base_path if not base_path.is_absolute() else base_path).resolve()
        merged = _merge(merged, _read_file(base_path, (*stack, path), files), base_path)
    return _merge(merged, resolve_paths(data, path.parent), path)
