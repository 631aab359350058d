"""Support logits, DMCE, fusion and the per-image bank step (ovseg_core.bank.retrieval), row readers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovseg_core.bank.config import FusionConfig, IndexConfig, SearchConfig
from ovseg_core.bank.index import build_index
from ovseg_core.bank.pooling import region_queries
from ovseg_core.bank.retrieval import (
    ValueStore,
    fuse,
    fuse_support,
    retrieve_and_fuse,
    search_images,
    support_features,
    support_logits,
)
from ovseg_core.bank.rows import ArrayRows, NpyRows, PreadRows

S2 = math.sqrt(0.5)


def _store(rows: list[list[float]], text: list[list[float]]) -> ValueStore:
    return ValueStore(ArrayRows(np.array(rows, dtype=np.float16)), torch.tensor(text, dtype=torch.float32))


def test_support_is_the_unit_mean_of_found_values_and_all_missing_is_flagged():
    rows = ArrayRows(np.array([[1, 0], [0, 1], [3, 4], [1, 1]], dtype=np.float16))
    neighbours = np.array([[0, 1, -1], [2, 2, 2], [-1, -1, -1]])
    feats, found = support_features(neighbours, rows)
    # region 0: mean of (1,0), (0,1) -> unit (s, s); region 1: (3,4) -> (0.6, 0.8); region 2: none
    np.testing.assert_allclose(feats.numpy(), [[S2, S2], [0.6, 0.8], [0, 0]], atol=1e-6)
    assert found.tolist() == [True, True, False]


def test_support_logits_with_dmce_by_hand():
    main = _store([[1, 0], [0, 1]], text=[[1, 0], [0, 1], [S2, S2]])  # Q = 3
    aux = _store([[0, 1, 0], [0, 0, 1]], text=[[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    neighbours = np.array([[0, -1], [0, 1]])
    logits, found = support_logits(neighbours, [main])
    # region 0: support (1, 0) -> cos (1, 0, s); region 1: (s, s) -> (s, s, 1)
    np.testing.assert_allclose(logits.numpy(), [[1, 0, S2], [S2, S2, 1]], atol=1e-6)
    both, _ = support_logits(neighbours, [main, aux])
    # aux: region 0 -> (0,1,0) -> (1, 0, 0); region 1 -> (0, s, s) -> (s, s, 0); S = mean of the two
    np.testing.assert_allclose(both.numpy(), [[1, 0, S2 / 2], [S2, S2, 0.5]], atol=1e-6)
    tilted, _ = support_logits(neighbours, [main, aux], FusionConfig(aux_weight=0.25))
    np.testing.assert_allclose(tilted.numpy()[0], [1, 0, 0.75 * S2], atol=1e-6)
    assert found.tolist() == [True, True]
    with pytest.raises(ValueError, match="same queries"):
        support_logits(neighbours, [main, _store([[0, 1, 0]], text=[[0, 1, 0]])])


def test_fusion_by_hand_with_the_all_missing_fallback():
    own = torch.tensor([[[0.2, 0.4], [0.6, 0.8]], [[1.0, 0.0], [0.5, 0.1]]])  # (Q=2, H=2, W=2)
    labels = np.array([[0, 0], [1, 2]])
    region_logits = torch.tensor([[1.0, -1.0], [0.0, 2.0], [9.0, 9.0]])
    found = np.array([True, True, False])
    fused = fuse(own, region_logits, labels, found)
    expected = torch.tensor([[[0.6, 0.7], [0.3, 0.8]], [[0.0, -0.5], [1.25, 0.1]]])  # pixel (1,1): own kept
    torch.testing.assert_close(fused, expected)
    alpha = fuse(own, region_logits, labels, found, FusionConfig(alpha=1.0))
    torch.testing.assert_close(alpha, own)
    with pytest.raises(ValueError, match="fuse needs"):
        fuse(own, region_logits, labels[:1], found)


def _reference_pipeline(own, region_map, vfm, keys, main, aux, text_main, text_aux, k):
    """The reference's per-image steps in plain numpy/torch, with exact (brute-force) search."""
    full = F.normalize(F.interpolate(vfm[None], size=region_map.shape, mode="bilinear", align_corners=False)[0], dim=0)
    pix = full.permute(1, 2, 0).numpy()
    ids = np.unique(region_map)
    queries = np.stack([pix[region_map == v].mean(0) for v in ids])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    unit_keys = keys.astype(np.float32) / (np.linalg.norm(keys.astype(np.float32), axis=1, keepdims=True) + 1e-12)
    nn = np.argsort(-(queries @ unit_keys.T), axis=1, kind="stable")[:, :k]
    out = own.clone().numpy()
    for r, v in enumerate(ids):
        s_main = main[nn[r]].astype(np.float32).mean(0)
        s_aux = aux[nn[r]].astype(np.float32).mean(0)
        logit = 0.5 * (s_main / np.linalg.norm(s_main)) @ text_main.T + 0.5 * (s_aux / np.linalg.norm(s_aux)) @ text_aux.T
        m = region_map == v
        out[:, m] = 0.5 * out[:, m] + 0.5 * logit[:, None]
    return nn, out


def test_retrieve_and_fuse_equals_a_direct_computation_with_exact_search():
    rng = np.random.default_rng(0)
    n, c, q = 500, 32, 5
    keys = rng.standard_normal((n, c)).astype(np.float16)
    main = rng.standard_normal((n, 16)).astype(np.float16)
    aux = rng.standard_normal((n, 8)).astype(np.float16)
    text_main = F.normalize(torch.randn(q, 16), dim=1)
    text_aux = F.normalize(torch.randn(q, 8), dim=1)
    region_map = rng.integers(0, 4, (24, 30))
    vfm = torch.randn(c, 6, 8)
    own = torch.randn(q, 24, 30)
    bank = build_index(keys, cfg=IndexConfig(kind="flat"))
    stores = [ValueStore(ArrayRows(main), text_main), ValueStore(ArrayRows(aux), text_aux)]
    fused, support = retrieve_and_fuse(own, region_map, vfm, bank, stores, SearchConfig(k=7))
    nn, expected = _reference_pipeline(own, region_map, vfm, keys, main, aux, text_main.numpy(), text_aux.numpy(), 7)
    np.testing.assert_array_equal(support.neighbours, nn)
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-5)
    assert support.region_ids.tolist() == [0, 1, 2, 3] and support.found.all()


def test_a_batch_searched_in_one_call_equals_each_image_searched_alone_bit_for_bit():
    """The pipeline searches every region of a stage batch in one call (search_images)."""
    rng = np.random.default_rng(3)
    c, q = 64, 4
    keys = rng.standard_normal((2000, c)).astype(np.float16)
    store = ValueStore(ArrayRows(rng.standard_normal((2000, 16)).astype(np.float16)), F.normalize(torch.randn(q, 16), dim=1))
    bank = build_index(keys)  # the reference IVF-PQ (nlist 357, nprobe 256)
    images = [(rng.integers(0, r, (20, 26)), torch.randn(c, 5, 7), torch.randn(q, 20, 26)) for r in (3, 9, 30)]
    for search in (SearchConfig(), SearchConfig(nprobe_max=8, k=5)):
        alone = [retrieve_and_fuse(own.clone(), m, v, bank, [store], search) for m, v, own in images]
        pooled = [region_queries(v, m) for m, v, _ in images]
        batch = search_images([p[2] for p in pooled], bank, search)
        assert [n.shape[0] for n in batch] == [len(np.unique(m)) for m, _, _ in images]
        for (fused, support), (ids, labels, _), neighbours, (_, _, own) in zip(alone, pooled, batch, images):
            np.testing.assert_array_equal(neighbours, support.neighbours)
            got, _ = fuse_support(own.clone(), ids, labels, neighbours, [store])
            assert torch.equal(got, fused)
    assert search_images([], bank) == []


def test_a_region_with_no_neighbour_keeps_its_own_logits():
    """An empty index returns -1 for every neighbour (the reference would divide by zero)."""
    keys = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float16)
    bank = build_index(keys, cfg=IndexConfig(kind="flat"))
    bank.index.reset()  # no vector left: every neighbour id is -1
    own = torch.randn(3, 5, 6)
    store = ValueStore(ArrayRows(np.ones((300, 4), dtype=np.float16)), F.normalize(torch.randn(3, 4), dim=1))
    fused, support = retrieve_and_fuse(own, np.zeros((5, 6), dtype=np.int64), torch.randn(64, 5, 6), bank, [store])
    assert (support.neighbours == -1).all() and not support.found.any()
    torch.testing.assert_close(fused, own)
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("reader", ["npy", "pread", "raw"])
def test_row_readers_read_only_the_asked_rows_in_order(tmp_path, reader):
    data = np.arange(40 * 6, dtype=np.float16).reshape(40, 6)
    np.save(tmp_path / "v.npy", data)
    data.tofile(tmp_path / "v.raw")
    ids = np.array([7, 3, 3, 39, 0, 8, 9])
    with open(tmp_path / ("v.raw" if reader == "raw" else "v.npy"), "rb") as f:
        if reader == "raw":
            rows = PreadRows(f, shape=(40, 6), dtype="float16", offset=0)
        else:
            rows = NpyRows(f) if reader == "npy" else PreadRows(f)
        assert (rows.n_rows, rows.dim, rows.dtype) == (40, 6, np.float16)
        np.testing.assert_array_equal(rows.rows(ids), data[ids])
        assert rows.rows(np.array([], dtype=np.int64)).shape == (0, 6)
        with pytest.raises(ValueError, match="0..39"):
            rows.rows(np.array([40]))


def test_row_reader_errors(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with open(tmp_path / "bad.npy", "rb") as f, pytest.raises(ValueError, match=".npy"):
        NpyRows(f)
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 2), dtype=np.float16)))
    with open(tmp_path / "f.npy", "rb") as f, pytest.raises(ValueError, match="Fortran"):
        PreadRows(f)
    np.zeros((3, 2), dtype=np.float16).tofile(tmp_path / "short.raw")
    with open(tmp_path / "short.raw", "rb") as f, pytest.raises(ValueError, match="truncated"):
        PreadRows(f, shape=(5, 2), dtype="float16", offset=0).rows(np.array([4]))
    with pytest.raises(ValueError, match="ValueStore.text"):
        ValueStore(ArrayRows(np.zeros((3, 2), dtype=np.float16)), torch.zeros(4, 3))


def test_fusion_in_place_and_over_many_bands_equals_the_formula():
    gen = torch.Generator().manual_seed(0)
    own = torch.randn(6, 37, 11, generator=gen)
    labels = np.random.default_rng(0).integers(0, 4, (37, 11))
    region_logits = torch.randn(4, 6, generator=gen)
    found = np.array([True, False, True, True])
    w = np.where(found, 0.3, 1.0)[labels]
    s = (region_logits.numpy() * np.where(found, 0.7, 0.0)[:, None])[labels].transpose(2, 0, 1)
    expected = own.numpy() * w + s
    cfg = FusionConfig(alpha=0.3)
    np.testing.assert_allclose(fuse(own, region_logits, labels, found, cfg).numpy(), expected, atol=1e-6)
    same = own.clone()
    assert fuse(same, region_logits, labels, found, cfg, out=same) is same
    np.testing.assert_allclose(same.numpy(), expected, atol=1e-6)
