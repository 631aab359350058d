"""``StoreTemporary`` gathers writes in memory and answers seeks and tells there: the file it moves into the store
must hold exactly the bytes that the same writes, seeks and flushes give on an in-memory file (``io.BytesIO``),
whatever the buffer size; a pack written through it must be byte for byte the pack ``zipfile`` writes on a plain
``BytesIO``."""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest

import storage.fstemp as fstemp
from storage.fsio import Backend
from storage.fstemp import StoreTemporary
from storage.packs import PackWriter


@pytest.mark.parametrize("buffer_bytes", [1, 7, 64, 4 << 20])
def test_random_writes_seeks_and_flushes_give_the_bytes_of_an_in_memory_file(tmp_path, monkeypatch, buffer_bytes):
    monkeypatch.setattr(fstemp, "_BUFFER_BYTES", buffer_bytes)
    backend, rng = Backend(str(tmp_path)), random.Random(buffer_bytes)
    for trial in range(60):
        path = os.path.join(str(tmp_path), f"f{trial}")
        ref, tmp = io.BytesIO(), StoreTemporary(backend, path)
        for _ in range(rng.randint(1, 60)):
            op = rng.random()
            if op < 0.5:  # including writes that start before the buffer and writes past the end
                data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 90)))
                assert tmp.write(data) == ref.write(data)
            elif op < 0.75:
                offset = rng.randint(0, len(ref.getvalue()) + 6)  # past the end too: a hole reads as zeros
                assert tmp.seek(offset) == ref.seek(offset)
            elif op < 0.85:
                assert tmp.seek(0, os.SEEK_END) == ref.seek(0, os.SEEK_END)
            elif op < 0.92:
                delta = rng.randint(-ref.tell(), 5)
                assert tmp.seek(delta, os.SEEK_CUR) == ref.seek(delta, os.SEEK_CUR)
            else:
                tmp.flush()
            assert tmp.tell() == ref.tell()
        assert tmp.commit() == len(ref.getvalue())
        with open(path, "rb") as f:
            assert f.read() == ref.getvalue(), trial
        assert not os.path.exists(tmp.tmp)


def test_a_flushed_write_is_in_the_temporary_before_the_commit(tmp_path):
    tmp = StoreTemporary(Backend(str(tmp_path)), os.path.join(str(tmp_path), "rows"))
    tmp.write(b"abc")
    with open(tmp.tmp, "rb") as f:
        assert f.read() == b""  # gathered in memory
    tmp.flush()
    with open(tmp.tmp, "rb") as f:
        assert f.read() == b"abc"  # what a kill after a flush leaves in the temporary
    tmp.discard()
    assert not os.path.exists(tmp.tmp)


@pytest.mark.parametrize("buffer_bytes", [10, 4 << 20])
def test_a_pack_through_the_temporary_is_the_pack_zipfile_writes_in_memory(tmp_path, monkeypatch, buffer_bytes):
    monkeypatch.setattr(fstemp, "_BUFFER_BYTES", buffer_bytes)
    rng = np.random.default_rng(0)
    items = {f"img{i}": {"a": rng.standard_normal((i + 1, 5)).astype(np.float32),
                         "m": rng.integers(0, 9, (4, 3 * i + 1)).astype(np.int32), "e": np.zeros((0, 3), np.uint8)}
             for i in range(12)}
    packs = []
    for f in (io.BytesIO(), StoreTemporary(Backend(str(tmp_path)), os.path.join(str(tmp_path), "pack.zip"))):
        w = PackWriter(f, {"stage": "s", "key": "k"})
        entries = [w.add(item, arrays, {"i": n, "name": item}) for n, (item, arrays) in enumerate(items.items())]
        w.close()
        if isinstance(f, io.BytesIO):
            packs.append((f.getvalue(), entries))
        else:
            f.commit()
            with open(os.path.join(str(tmp_path), "pack.zip"), "rb") as g:
                packs.append((g.read(), entries))
    assert packs[0] == packs[1]
