"""A pipeline bank built with the FastScan index kind (``index: {kind: ivfpq_fastscan}``), with in-RAM re-ranking
codes (``refine_m``), served by ``corrclipv2``: the neighbours equal an independent search of the stored index
on independently computed queries, and their recall against a numpy brute force over the stored keys is what the
4-bit codes allow; re-ranking with the codes equals a numpy re-scoring of the candidates with the decoded codes.
Random weights: every number checks the machinery, none is a method result."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from flows.graph import build_plan
from flows.config import parse_experiment
from flows.pipeline import run_experiment
from ovseg_core.bank.index import index_from_bytes
from storage.store import Store
from tasks.bank_index import fuse_with_bank, registry_of, retrieve_batch
from tasks.bank_params import BANK_ITEM
from tasks.runtime import RunSettings, StageContext
from tests.flows.conftest import SAMPLE
from tests.flows.test_banks import BANK_IMAGES, _experiment, _folder, _queries

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
K = 7
INDEX = {"kind": "ivfpq_fastscan", "pq_m": 8, "pq_nbits": 4, "metric": "inner_product", "nlist_factor": 1.0, "refine_m": 16}


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / e.shape[0] for f, e in zip(found, exact)]))


@pytest.mark.slow
def test_a_fastscan_bank_is_served_by_corrclipv2_with_the_neighbours_of_an_independent_search(tmp_path):
    folder = _folder(tmp_path, BANK_IMAGES)
    data = _experiment(tmp_path, folder, index=INDEX)
    data.update(datasets=[{"name": "voc", "spec": "VOC21", "layout": "voc", "root": str(SAMPLE / "voc2012-sample"),
                           "limit": 1}],
                methods=[{"name": "fast", "method": "corrclipv2", "params": {"bank": "sample", "bank_k": K}},
                         {"name": "fast-codes", "method": "corrclipv2",
                          "params": {"bank": "sample", "bank_k": K, "bank_rerank": True, "bank_rerank_candidates": 1000,
                                     "bank_rerank_with": "codes", "bank_coarse_dtype": "bfloat16"}}])
    exp = parse_experiment(data, source="test")
    summary = run_experiment(exp, progress=False, orchestrate=False)
    assert not summary.failures if hasattr(summary, "failures") else True
    (_, plan) = build_plan(exp)
    store = Store(tmp_path / "store")
    results = {}
    for name, method in zip(("fast", "fast-codes"), plan.methods):
        rec = method.prediction.upstream["reconstruction"]
        row = {"image_id": next(iter(store.complete_items("reconstruction", rec.key)))}
        assert store.item_attrs("reconstruction", rec.key, row["image_id"])["bank"]["without_support"] == 0
        ctx = StageContext(rec, RunSettings(str(tmp_path / "store")), "voc")
        ids_map = ctx.read_upstream("sam_masks", row, ["ids"])["ids"]
        vfm = ctx.read_upstream("vfm_features", row, ["features"])["features"]
        text = torch.from_numpy(ctx.read_shared("text_embeddings")["embeddings"]).float()
        hw = rec.params.window.plan(ids_map.shape).resized_hw
        arrays = ctx.read_shared("bank_index", BANK_ITEM)
        (got,) = retrieve_batch(ctx, arrays, [(hw, ids_map, torch.from_numpy(vfm))])
        _, support = fuse_with_bank(ctx, arrays, torch.zeros((text.shape[0], *hw)), got, text, None)
        region_map = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(ids_map.astype(np.float32))[None, None],
                                                                size=hw, mode="nearest")[0, 0]).astype(np.int64)
        results[name] = (rec, arrays, support, _queries(vfm, region_map))
    rec, arrays, support, (ids, queries) = results["fast"]
    attrs = store.item_attrs("bank_index", rec.upstream["bank_index"].key, BANK_ITEM)
    assert attrs["kind"] == "ivfpq_fastscan" and attrs["metric"] == "inner_product"
    np.testing.assert_array_equal(support.region_ids, ids)
    # independently: FAISS's own search of the stored index (its own coarse step), every list probed
    index = index_from_bytes(arrays["index"].tobytes())
    assert isinstance(faiss.downcast_index(index.inner), faiss.IndexIVFPQFastScan) and index.nlist <= 256
    _, own = index.index.search(queries.astype(np.float32), K, params=faiss.SearchParametersIVF(nprobe=index.nlist))
    same = np.mean([len(set(a) & set(b)) / K for a, b in zip(support.neighbours, own)])
    assert same > 0.9  # equal up to ties of the quantised 16-bit distances and float rounding of the queries
    # recall against a numpy brute force over the stored keys
    reg = registry_of(arrays)
    keys_key = rec.upstream["bank_index"].upstream["bank_keys"].key
    keys = np.concatenate([store.read_item("bank_keys", keys_key, i)["keys"] for i in reg.images]).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True) + 1e-12
    exact = np.argsort(-(queries @ keys.T), axis=1, kind="stable")[:, :K]
    plain = _recall(support.neighbours, exact)
    # re-ranked with the in-RAM codes (every probed code a candidate): the top K of the decoded codes' scores
    _, _, codes_support, _ = results["fast-codes"]
    codes = arrays["refine_codes"]
    m = codes.shape[1]
    book, lists = arrays["refine_codebook"], arrays["refine_lists"]
    decoded = index.centroids()[lists] + np.concatenate([book[j][codes[:, j]] for j in range(m)], axis=1)
    positions = np.argsort(-(queries @ decoded.T), axis=1, kind="stable")[:, :K]
    expected = index.id_map()[positions]
    assert np.mean([len(set(a) & set(b)) / K for a, b in zip(codes_support.neighbours, expected)]) > 0.95
    reranked = _recall(codes_support.neighbours, exact)
    assert reranked >= plain and reranked > 0.6, (plain, reranked)
