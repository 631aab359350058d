"""Memory banks in the stage graph: each ``banks:`` entry is a dataset whose items are images.

A bank's plan holds, per image, its regions (``sam_masks``, the experiment's region stage with
the bank's source), per CLIP the CorrCLIP inputs of the authors' builder (``clip_layers``,
``dino_features``, ``mask_clustering`` without DBSCAN, ``mask_class_tokens``) and the
``bank_values``, the ``vfm_features`` and ``bank_keys``; and one whole-bank ``bank_index`` node
keyed by the set of images. Every guarantee of the store holds for them (verified completion,
leases, resume, ``cache verify``, gc, the run journal): they are ordinary stage outputs.
A corrclipv2 method with ``params.bank`` reads the index node (``bank_use``); it is not part of
the method's dataset plan, so the bank runs once, before the datasets that use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.config import BankEntry, DatasetEntry, Experiment, MethodEntry
from ovseg_core.backbones import num_blocks
from ovseg_core.bank.config import FusionConfig, IndexConfig, SearchConfig
from ovseg_core.datasets import FAMILY_MODELS
from ovseg_core.methods import get_method
from ovseg_core.names import did_you_mean
from storage.layouts import list_layout
from tasks import bank_params as BP
from tasks import params as P
from tasks.runtime import StageNode
from tasks.stages import BANK_STORED, STAGES

BANK_BATCH_SIZE = 32  # a bank's default batch (banks[].batch_size): cheap per-image stages, per-batch costs weigh more
BANK_DATASET_PREFIX = "bank-"  # a bank's dataset name in manifests, tables and the run summary
BANK_WINDOW_PAD = 56  # CorrCLIP's window padding (the DINO /8 and CLIP /14 grids)
# method params of a bank user (``methods[].params``), with their defaults: SearchConfig / FusionConfig fields
BANK_USE_PARAMS: Mapping[str, Any] = {"bank": None, "bank_k": 20, "bank_nprobe": 256, "bank_rerank": False,
                                      "bank_alpha": 0.5, "bank_aux_weight": 0.5, "bank_coarse_ef": None,
                                      "bank_rerank_candidates": 100, "bank_coarse_dtype": "float32", "bank_coarse_refine": 0,
                                      "bank_rerank_with": "keys", "bank_fastscan_implem": 0}


def bank_dataset_name(bank: str) -> str:
    return BANK_DATASET_PREFIX + bank


def split_bank_params(m: MethodEntry) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method params, bank params)`` of a method entry: the ``bank*`` keys go to the bank."""
    bank = {k: v for k, v in m.params.items() if k.startswith("bank")}
    for k in bank:
        if k not in BANK_USE_PARAMS:
            raise ValueError(f"methods[{m.name}].params.{k}: unknown bank parameter{did_you_mean(k, BANK_USE_PARAMS)}; "
                             f"bank parameters: {', '.join(BANK_USE_PARAMS)}")
    if bank and "bank" not in bank:
        raise ValueError(f"methods[{m.name}].params: {', '.join(bank)} without bank: name the bank (params.bank)")
    return {k: v for k, v in m.params.items() if k not in bank}, bank


def bank_use(m: MethodEntry, bank_params: Mapping[str, Any]) -> BP.BankUse | None:
    """The typed bank use of a method (None without ``params.bank``); bad values name the parameter."""
    if not bank_params:
        return None
    p = {**BANK_USE_PARAMS, **bank_params}
    try:
        return BP.BankUse(str(p["bank"]),
                          SearchConfig(k=int(p["bank_k"]), nprobe_max=int(p["bank_nprobe"]),
                                       rerank=bool(p["bank_rerank"]), rerank_candidates=int(p["bank_rerank_candidates"]),
                                       coarse_dtype=str(p["bank_coarse_dtype"]), coarse_refine=int(p["bank_coarse_refine"]),
                                       rerank_with=str(p["bank_rerank_with"]), fastscan_implem=int(p["bank_fastscan_implem"]),
                                       coarse_ef_search=None if p["bank_coarse_ef"] is None else int(p["bank_coarse_ef"])),
                          FusionConfig(alpha=float(p["bank_alpha"]), aux_weight=float(p["bank_aux_weight"])))
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods[{m.name}].params: bank parameters: {e}") from e


def bank_models(exp: Experiment, b: BankEntry) -> tuple[list[str], str, str]:
    """``(clips, vfm, dino)`` of a bank: its own, else the experiment's, else CorrCLIPv2's / CorrCLIP's.

    Without ``clips``: ``[models.clip]`` when the experiment names a CLIP, else the authors' pair, MetaCLIP
    ViT-L/14 and DMCE's auxiliary DFN2B-CLIP ViT-B/16 (an imported bank: one per ``imported.values`` file).
    """
    v2 = FAMILY_MODELS["corrclipv2"]
    if b.clips:
        clips = list(b.clips)
    elif exp.models.clip:
        clips = [exp.models.clip]
    else:
        clips = [str(v2.clip), str(v2.aux_clip)][: len(b.imported.values) if b.imported is not None else 2]
    vfm = b.vfm or exp.models.vfm or str(FAMILY_MODELS["corrclipv2"].vfm)
    return clips, vfm, exp.models.dino


def images_digest(b: BankEntry, missing: list[str] | None = None) -> str:
    """sha256 over (relative path, size, mtime) of the bank's images: the set of images keys its index."""
    try:
        _, candidates = list_layout(b.layout, Path(b.root), b.split, None, False)
    except FileNotFoundError as e:
        if missing is None:
            raise ValueError(f"banks[{b.name}].root: {e}") from e
        missing.append(f"bank {b.name}: {e}")
        return "missing"
    h = hashlib.sha256()
    for c in sorted(candidates, key=lambda c: c.rel_path)[: b.limit]:
        try:
            st = c.image.stat()
            h.update(f"{c.rel_path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{c.rel_path}\0unreadable\n".encode())
    return h.hexdigest()


def bank_batch_size(exp: Experiment, b: BankEntry) -> int:
    """Images per batch of the bank's stages: ``banks[].batch_size``, else the larger of ``BANK_BATCH_SIZE`` and
    ``runner.batch_size`` (docs/banks.md, "Batch size of a bank")."""
    return b.batch_size if b.batch_size is not None else max(BANK_BATCH_SIZE, exp.runner.batch_size)


def bank_dataset(b: BankEntry) -> DatasetEntry:
    """The bank's images as a dataset entry (no ground truth; the one class only satisfies the schema)."""
    return DatasetEntry(name=bank_dataset_name(b.name), classes=["region"], layout=b.layout, root=b.root,
                        split=b.split, limit=b.limit, max_pixels=b.max_pixels)


@dataclasses.dataclass(frozen=True)
class Spec:
    """One node of a bank: parameters, weights identity, where outside inputs live (as ``flows.graph.NodeSpec``)."""

    params: Any
    weights: Mapping[str, Any] | None = None
    inputs_dir: str | None = None


def bank_node_specs(exp: Experiment, b: BankEntry, sam: Any, ident: Callable[[str], Any]
                    ) -> dict[str, list[tuple[str, Spec]]]:
    """``{stage: [(chain, spec)]}`` of a bank's per-image nodes: one chain per CLIP (``clip:<name>``) and the
    ``keys`` chain, sharing regions (``sam``: the region stage's spec), DINO and clustering by key.

    ``ident``: weights identity of a backbone name (``flows.graph.weights_identity``).
    """
    fdt, dt = exp.feature_dtype, exp.dtype
    clips, vfm, dino = bank_models(exp, b)
    window = P.WindowParams(int(b.window.short_side or 448), int(b.window.crop or 336), int(b.window.stride or 112),
                            BANK_WINDOW_PAD)
    method = get_method("corrclip")
    out: dict[str, list[tuple[str, Spec]]] = {}
    sam_spec = Spec(sam.params, sam.weights, sam.inputs_dir)
    for clip in clips:
        nb = num_blocks(clip)
        cfg = method.build({"mask_clustering": False}, nb)  # the authors' builder: no DBSCAN
        clip_id, chain = {"clip": ident(clip)}, f"clip:{clip}"
        out.setdefault("sam_masks", []).append((chain, sam_spec))
        out.setdefault("dino_features", []).append((chain, Spec(
            P.DinoParams(dino, window, fdt, dt, exp.models.dino_pos, "from_clip"), {"dino": ident(dino)})))
        out.setdefault("clip_layers", []).append((chain, Spec(
            P.ClipParams(clip, window, tuple(sorted(method.required_blocks(cfg, nb))), fdt, dt), clip_id)))
        out.setdefault("mask_clustering", []).append(
            (chain, Spec(P.ClusteringParams(window, method.clustering_config(cfg)))))
        if method.semantic_stage(cfg):
            out.setdefault("mask_class_tokens", []).append((chain, Spec(
                P.SemanticParams(clip, window, fdt, dt, method.relabel_config(cfg)), clip_id)))
        out.setdefault("bank_values", []).append((chain, Spec(
            BP.BankValuesParams("corrclip", method.reconstruction_config(cfg), clip, window, dt, b.empty_region),
            clip_id)))
    out.setdefault("sam_masks", []).append(("keys", sam_spec))
    out["vfm_features"] = [("keys", Spec(P.VfmParams(vfm, exp.models.vfm_max_side, fdt, dt), {"vfm": ident(vfm)}))]
    out["bank_keys"] = [("keys", Spec(BP.BankKeysParams(b.empty_region)))]
    return out


def bank_persist(exp: Experiment, b: BankEntry) -> dict[str, bool]:
    """Which of the bank's stages are stored: its regions, values, keys and index always; its intermediates (DINO,
    CLIP blocks, VFM maps, clustering, class tokens: 50-130x the bank's own bytes with the authors' models) only
    where ``persist`` (the experiment's, then the bank's) says ``true``. The others are computed in memory, once
    per chain batch (``tasks.chain``). The experiment's ``sam_masks: false`` is for its datasets only."""
    default = {s: False for s, st in STAGES.items() if st.per == "image" and s not in BANK_STORED and s != "scoring"}
    return {**default, **{k: v for k, v in exp.persist.items() if k not in BANK_STORED}, **b.persist}


def index_upstream(exp: Experiment, b: BankEntry, chains: Mapping[str, Mapping[str, StageNode]]) -> dict[str, StageNode]:
    """The ``bank_index`` node's inputs: the keys, the main CLIP's values and DMCE's auxiliary values."""
    clips = bank_models(exp, b)[0]
    upstream = {"bank_keys": chains["keys"]["bank_keys"], "bank_values": chains[f"clip:{clips[0]}"]["bank_values"]}
    if len(clips) > 1:  # DMCE: the auxiliary CLIP's values, read through the same region ids
        upstream["bank_aux_values"] = chains[f"clip:{clips[1]}"]["bank_values"]
    return upstream


def index_params(b: BankEntry, missing: list[str] | None = None) -> BP.BankIndexParams:
    """The ``bank_index`` parameters; an unknown or bad ``banks[].index`` key is an error naming it."""
    fields = [f.name for f in dataclasses.fields(IndexConfig)]
    for k in b.index:
        if k not in fields:
            raise ValueError(f"banks[{b.name}].index.{k}: unknown key{did_you_mean(k, fields)}; valid keys: "
                             f"{', '.join(fields)}")
    try:
        cfg = IndexConfig(**b.index)
    except (TypeError, ValueError) as e:
        raise ValueError(f"banks[{b.name}].index: {e}") from e
    return BP.BankIndexParams(b.name, cfg, images_digest(b, missing))


IMPORTED_LAYOUT = "row_file"  # an imported store's rows: one contiguous file (storage.row_files)


def file_digest(path: str) -> str:
    """sha256 of a file's name, size and mtime (the import's key; the content hash is its provenance)."""
    st = Path(path).stat()
    return hashlib.sha256(f"{Path(path).name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def imported_index_node(exp: Experiment, b: BankEntry) -> StageNode:
    """The ``bank_index`` node of an imported bank and its ``bank_values`` nodes (row files of the ``.pt`` stores),
    keyed by the files (name, size, mtime): ``ovseg bank import`` writes exactly these outputs."""
    assert b.imported is not None
    clips = bank_models(exp, b)[0]
    if len(clips) != len(b.imported.values):
        raise ValueError(f"banks[{b.name}]: {len(b.imported.values)} value stores but clips lists {len(clips)} CLIP(s); "
                         "name the CLIP of each store in order (clips: [main, auxiliary])")
    try:
        values = [StageNode("bank_values", BP.ImportedValuesParams("authors_pt", Path(f).name, file_digest(f), clip,
                                                                   IMPORTED_LAYOUT), STAGES["bank_values"].code_version)
                  for f, clip in zip(b.imported.values, clips)]
        digest = "import:" + file_digest(b.imported.index)
    except OSError as e:
        raise ValueError(f"banks[{b.name}].imported: {e}") from e
    upstream = {"bank_values": values[0], **({"bank_aux_values": values[1]} if len(values) > 1 else {})}
    return StageNode("bank_index", BP.BankIndexParams(b.name, IndexConfig(), digest), STAGES["bank_index"].code_version,
                     upstream)


def check_bank_user(m: MethodEntry, use: BP.BankUse, clip: str, index_node: StageNode) -> None:
    """A method retrieves from a bank whose main values are of its own CLIP (the support logits score its text)."""
    main = index_node.upstream["bank_values"].params.backbone
    if main != clip:
        raise ValueError(f"methods[{m.name}].params.bank: bank {use.bank!r} stores values of {main}, but the method "
                         f"runs {clip}; give the bank clips: [{clip}, ...] or the method clip: {main}")


def aux_clip(index_node: StageNode) -> str | None:
    """DMCE's auxiliary CLIP of a bank index node, or None."""
    aux = index_node.upstream.get("bank_aux_values")
    return None if aux is None else aux.params.backbone
