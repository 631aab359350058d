"""Packs: many items of one stage output in one file, readable as a Zarr v3 hierarchy.

A pack is a ZIP file (stored, not deflated) whose members form a Zarr v3 group, so
``zarr.open_group(zarr.storage.ZipStore(path, mode="r"))`` opens it::

    zarr.json                          root group (attrs: stage, key, pack)
    <item>/zarr.json                   one group per item (attrs: the item's attrs)
    <item>/<array>/zarr.json           array metadata: shape, dtype, codecs (bytes + blosc lz4, shuffled)
    <item>/<array>/c/0/...             the array's single chunk

The pipeline does not go through zarr's array machinery to write or read packs (about 1 ms
per array, more than the whole per-image budget of a small stage): ``PackWriter`` writes the
same metadata and chunk bytes zarr would, and ``decode_arrays`` decodes a chunk with the
same codec. The test suite reads packs back with zarr itself.

Each item's members are contiguous, so an item is read with one ranged request. What an item
wrote (members, offsets, sizes, CRC-32) goes into the pack's completion record
(``storage.records``); a read checks every size and checksum against it.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from numcodecs import Blosc

_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature .. name length, extra length (30 bytes)
_CODEC = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE)
_ALLOWED_KINDS = "biuf"


class PackDamagedError(ValueError):
    """Stored bytes do not match the completion record (missing, truncated or altered)."""


@dataclass(frozen=True)
class Member:
    """One file inside a pack: where its bytes are and their checksum."""

    name: str
    offset: int
    size: int
    crc32: int

    def to_json(self) -> list[Any]:
        return [self.name, self.offset, self.size, self.crc32]

    @classmethod
    def from_json(cls, v: list[Any]) -> "Member":
        return cls(str(v[0]), int(v[1]), int(v[2]), int(v[3]))


@dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and chunk member of one stored array (``chunk`` is None for empty arrays)."""

    shape: tuple[int, ...]
    dtype: str
    chunk: str | None

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "chunk": self.chunk}

    @classmethod
    def from_json(cls, v: Mapping[str, Any]) -> "ArrayInfo":
        return cls(tuple(int(x) for x in v["shape"]), str(v["dtype"]), v.get("chunk"))


@dataclass(frozen=True)
class ItemEntry:
    """What one item wrote into a pack (part of the pack's completion record)."""

    item: str
    attrs: Mapping[str, Any]
    arrays: Mapping[str, ArrayInfo]
    members: tuple[Member, ...]

    @property
    def span(self) -> tuple[int, int]:
        return min(m.offset for m in self.members), max(m.offset + m.size for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {"attrs": dict(self.attrs), "arrays": {k: v.to_json() for k, v in self.arrays.items()},
                "members": [m.to_json() for m in self.members]}

    @classmethod
    def from_json(cls, item: str, v: Mapping[str, Any]) -> "ItemEntry":
        return cls(item, dict(v.get("attrs", {})), {k: ArrayInfo.from_json(a) for k, a in v["arrays"].items()},
                   tuple(Member.from_json(m) for m in v["members"]))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1024)
def _array_metadata_json(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The zarr v3 ``zarr.json`` of a single-chunk array of this shape and dtype with the pack codec, as bytes
    (cached: the items of a stage repeat a few shapes)."""
    return _json(_array_metadata(shape, dtype))


def _array_metadata(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of a single-chunk array with the pack codec."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}
                                    if dtype.itemsize > 1 else {"name": "bytes"}]
    codecs.append({"name": "blosc", "configuration": {"typesize": dtype.itemsize, "cname": "lz4", "clevel": 5,
                                                      "shuffle": "shuffle", "blocksize": 0}})
    fill: Any = False if dtype.kind == "b" else (0.0 if dtype.kind == "f" else 0)
    return {"zarr_format": 3, "node_type": "array", "shape": list(shape), "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(int(s), 1) for s in shape]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": fill, "codecs": codecs, "attributes": {}, "storage_transformers": []}


def check_array(item: str, name: str, arr: Any) -> np.ndarray:
    """The array as stored (little-endian, C order); rejects scalars and object dtypes."""
    a = np.asarray(arr)
    if a.ndim == 0:
        raise ValueError(f"array {name!r} of item {item!r} is 0-dimensional; record scalars in attrs instead")
    if a.dtype.kind not in _ALLOWED_KINDS:
        raise ValueError(f"array {name!r} of item {item!r} has dtype {a.dtype}; store numbers or booleans")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


class PackWriter:
    """Writes items into one pack file (a ZIP opened on ``fileobj``, seekable, written from offset 0).

    Use ``add`` per item, then ``close``; entries of the added items come back from ``add`` and
    stay valid only once the finished pack is in place and its record written.
    """

    def __init__(self, fileobj: IO[bytes], root_attrs: Mapping[str, Any]):
        self._f = fileobj
        self._zip = zipfile.ZipFile(fileobj, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._root_attrs = dict(root_attrs)
        self._names: set[str] = set()
        self.nbytes = 0

    def _member(self, name: str, data: bytes) -> Member:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        self._zip.writestr(info, data)
        offset = info.header_offset + _ZIP_LOCAL_HEADER.size + len(info.filename.encode()) + len(info.extra)
        self.nbytes += len(data)
        return Member(name, offset, len(data), info.CRC)

    def add(self, item: str, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> ItemEntry:
        """Append one item: its group, then each array's metadata and chunk."""
        if item in self._names:
            raise ValueError(f"item {item!r} is already in this pack")
        checked = {name: check_array(item, name, a) for name, a in arrays.items()}
        group_attrs = json.loads(json.dumps(dict(attrs), default=str))
        members = [self._member(f"{item}/zarr.json", _json({"zarr_format": 3, "node_type": "group",
                                                            "attributes": group_attrs}))]
        infos = {}
        for name, a in checked.items():
            members.append(self._member(f"{item}/{name}/zarr.json", _array_metadata_json(a.shape, a.dtype)))
            chunk = None
            if a.size:
                chunk = f"{item}/{name}/c/" + "/".join("0" * a.ndim)
                members.append(self._member(chunk, _CODEC.encode(a)))
            infos[name] = ArrayInfo(tuple(int(s) for s in a.shape), a.dtype.name, chunk)
        self._names.add(item)
        return ItemEntry(item, group_attrs, infos, tuple(members))

    def abandon(self) -> None:
        """Stop writing (the file is then discarded by the caller)."""
        try:
            self._zip.close()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Write the root group and the ZIP directory."""
        self._member("zarr.json", _json({"zarr_format": 3, "node_type": "group", "attributes": self._root_attrs}))
        self._zip.close()
        self._f.flush()
        if hasattr(self._f, "fileno"):
            try:
                os.fsync(self._f.fileno())
            except (OSError, ValueError):
                pass


def verify_members(data: bytes, base: int, members: Iterable[Member], where: str) -> None:
    """Check that ``data`` (the pack bytes from offset ``base``) holds every member intact."""
    for m in members:
        lo = m.offset - base
        chunk = data[lo : lo + m.size]
        if lo < 0 or len(chunk) != m.size:
            raise PackDamagedError(f"{where}: member {m.name} is truncated or missing "
                                   f"({len(chunk) if lo >= 0 else 0} of {m.size} bytes)")
        if zlib.crc32(chunk) != m.crc32:
            raise PackDamagedError(f"{where}: member {m.name} fails its CRC-32 check (the bytes were altered)")


def decode_arrays(data: bytes, base: int, entry: ItemEntry, names: Iterable[str] | None, where: str
                  ) -> dict[str, np.ndarray]:
    """Verify and decode the requested arrays of one item from the pack bytes ``data`` (starting at ``base``)."""
    wanted = list(entry.arrays) if names is None else list(names)
    by_name = {m.name: m for m in entry.members}
    out = {}
    for name in wanted:
        info = entry.arrays.get(name)
        if info is None:
            raise KeyError(f"{where} has no array {name!r} (has {sorted(entry.arrays)})")
        dtype = np.dtype(info.dtype).newbyteorder("<")
        if info.chunk is None:
            out[name] = np.zeros(info.shape, dtype=dtype)
            continue
        member = by_name[info.chunk]
        verify_members(data, base, [member], where)
        raw = _CODEC.decode(data[member.offset - base : member.offset - base + member.size])
        expected = int(np.prod(info.shape)) * dtype.itemsize
        if len(raw) != expected:
            raise PackDamagedError(f"{where}: array {name!r} decodes to {len(raw)} bytes, expected {expected}")
        out[name] = np.frombuffer(raw, dtype=dtype).reshape(info.shape).astype(dtype.newbyteorder("="), copy=True)
    return out
