"""The stage graph of an experiment: which stage outputs, with which typed parameters and keys.

For every dataset and method the graph resolves the dataset preset (resize, window, logit
scale, thresholds), the method (``ovseg_core.methods.METHODS``) and the backbones into
``StageNode`` objects whose parameters are exactly what each stage reads
(``tasks.params``). Identical keys are one node: a sweep over CorrCLIP's TAU shares its SAM
masks, DINO features, CLIP dumps, clustering and mask class tokens, and an ablation of map
correction shares its reconstruction; CorrCLIPv2 beside CorrCLIP shares the text embeddings,
CLIP dumps and regions (its VFM map and mask class tokens are its own). Each method's backbones
come from ``method_backbone`` (the entry's, the experiment's, else the method paper's). Stages
and what they read: ``tasks.stages.STAGES``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import bank_graph
from flows.config import BankEntry, DatasetEntry, Experiment, MethodEntry, load_experiment
from flows.dataset_specs import class_names, dataset_spec
from flows.devices import check_device  # noqa: F401 - re-exported (flows.execute)
from flows.experiment_files import parse_override
from ovseg_core.backbones import num_blocks, patch_size
from ovseg_core.backbones import weights_identity as backbone_weights_identity
from ovseg_core.datasets import CLASS_SEPARATORS, FAMILY_MODELS, DatasetSpec, class_lines
from ovseg_core.features.region_files import RegionFileConfig
from ovseg_core.features.regions import SamRegionConfig, SuperpixelConfig
from ovseg_core.features.sam2_regions import Sam2RegionConfig
from ovseg_core.methods import Method, get_method
from ovseg_core.metrics import scoring_ignore_index
from tasks import params as P
from tasks.runtime import StageNode
from tasks.stages import STAGE_ORDER, STAGES, Stage

# SC-CLIP with ViT-L/14 uses other background thresholds (methods.md section 3).
SCCLIP_VITL_PROB_THD: Mapping[str, float] = {"VOC21": 0.2, "COCO-Object": 0.25}
# CorrCLIP pads windows to a multiple of lcm(8, 14) = 56: the DINO /8 and CLIP /14 grids fit
# exactly; a CLIP /16 grid of a 56-multiple that is not a 16-multiple is rounded down as in the
# reference (methods.md 2.1).
CORRCLIP_PAD_MULTIPLE = 56
# Families whose windows are padded to CORRCLIP_PAD_MULTIPLE (CorrCLIPv2 keeps v1's padding: its
# ``forward_slide`` pads to 56 whatever the correlation grid).
CORRCLIP_FAMILIES: tuple[str, ...] = ("corrclip", "corrclipv2")


@dataclass(frozen=True)
class MethodPlan:
    """The nodes that produce one method's predictions and scores on one dataset."""

    entry: MethodEntry
    method: Method
    prediction: StageNode
    scoring: StageNode
    num_classes: int
    class_names: tuple[str, ...]


@dataclass
class DatasetPlan:
    """All nodes of one dataset in dependency order, and the per-method end points."""

    dataset: DatasetEntry
    spec: DatasetSpec
    nodes: dict[tuple[str, str], StageNode] = field(default_factory=dict)
    methods: list[MethodPlan] = field(default_factory=list)
    index: int = 0  # position in the experiment's datasets list (error messages name datasets[index])
    batch_size: int | None = None  # images per batch of its stages; None: runner.batch_size (a bank: its own)

    def add(self, node: StageNode) -> StageNode:
        """Add a node; an identical key returns the node already there."""
        return self.nodes.setdefault(node.ident, node)

    def ordered(self) -> list[StageNode]:
        """Nodes sorted by stage order (a topological order of the graph)."""
        return sorted(self.nodes.values(), key=lambda n: (STAGE_ORDER.index(n.stage), n.key))


def make_node(stage: str, params: Any, upstream: Mapping[str, StageNode] | None = None,
              weights: Mapping[str, Any] | None = None, persist: Mapping[str, bool] | None = None) -> StageNode:
    """A graph node; its code version comes from the stage table, ``persist`` from the experiment."""
    return StageNode(stage, params, STAGES[stage].code_version, dict(upstream or {}), weights,
                     (persist or {}).get(stage, True))


def weights_identity(name: str, weights_dir: str | None, missing: list[str] | None = None) -> dict[str, Any]:
    """Identity of a backbone's weights for stage keys, without building the model.

    A missing weight file raises ``FileNotFoundError``, or with ``missing`` (a dry run) is
    appended there and identified as ``{"name": name, "missing": True}`` (a key no stored
    output has; present files keep their identity and keys).
    """
    try:
        return backbone_weights_identity(name, weights_dir=weights_dir)
    except FileNotFoundError as e:
        if missing is None:
            raise
        missing.append(f"weights of {name}: {e}")
        return {"name": name, "missing": True}


def _geometry(name: str) -> tuple[int, int]:
    return num_blocks(name), patch_size(name)


@dataclass(frozen=True)
class _Resolved:
    entry: MethodEntry
    method: Method
    clip: str
    vfm: str | None  # the VFM of a method with the "vfm" correlation (CorrCLIPv2), else None
    window: P.WindowParams
    config: Any
    blocks: tuple[str, ...]
    bank: Any = None  # tasks.bank_params.BankUse of a method with params.bank, else None


def method_backbone(exp: Experiment, m: MethodEntry, method: Method, role: str) -> str:
    """The backbone of ``role`` (``clip``, ``vfm``) a method runs with.

    The method entry's own (``methods[].clip``), else the experiment's (``models.clip``), else the method
    paper's (``Method.default_models``: CorrCLIPv2's MetaCLIP ViT-L/14 and C-RADIOv3-L), else CorrCLIP's
    (``FAMILY_MODELS["corrclip"]``, the experiment default of every other method).
    """
    chosen = getattr(m, role, None) or getattr(exp.models, role, None) or method.default_models.get(role)
    return chosen or str(getattr(FAMILY_MODELS["corrclip"], role))


def _resolve(exp: Experiment, spec: DatasetSpec, m: MethodEntry) -> _Resolved:
    method = get_method(m.method)
    params, bank_params = bank_graph.split_bank_params(m)
    clip_name = method_backbone(exp, m, method, "clip")
    vfm_name = method_backbone(exp, m, method, "vfm") if method.correlation == "vfm" else None
    nb, patch = _geometry(clip_name)
    preset = spec.presets[method.family]
    window = P.WindowParams(m.window.short_side or preset.short_side, m.window.crop or preset.crop,
                            m.window.stride or preset.stride,
                            CORRCLIP_PAD_MULTIPLE if method.family in CORRCLIP_FAMILIES else patch)
    try:
        cfg = method.build(params, nb)
    except ValueError as e:
        raise ValueError(f"methods[{m.name}].{e}{_override_hint(exp, ('methods', str(exp.methods.index(m)), 'params'))}"
                         ) from e
    return _Resolved(m, method, clip_name, vfm_name, window, cfg, method.required_blocks(cfg, nb),
                     bank_graph.bank_use(m, bank_params))


def _override_hint(exp: Experiment, loc: tuple[str, ...]) -> str:
    """`` [set by override 'KEY=VALUE']`` for the last ``--set`` override at, inside or above the key ``loc``."""
    hits = [o for o in exp.provenance.overrides
            if (parts := parse_override(o)[0])[:len(loc)] == loc or loc[:len(parts)] == parts]
    return f" [set by override {hits[-1]!r}]" if hits else ""


@dataclass(frozen=True)
class NodeSpec:
    """What the graph decides for one stage of one method: its parameters and weights.

    Its upstream is not part of it: ``wire`` derives it from the stage's declared inputs.
    """

    params: Any
    weights: Mapping[str, Any] | None = None
    inputs_dir: str | None = None  # where inputs outside the store live (pre-generated masks)


def wire(stage: Stage, chain: Mapping[str, StageNode]) -> dict[str, StageNode]:
    """A node's upstream, from its stage's declared inputs (``tasks.stages.Input``).

    Each role gets the node of the first of its sources that ``chain`` (the nodes of one
    method's graph so far, by stage) holds; an optional role without one is left out.

    Raises:
        ValueError: a required input has none of its sources in ``chain``.
    """
    upstream: dict[str, StageNode] = {}
    for inp in stage.inputs:
        if inp.explicit:  # set by the graph builder (flows.bank_graph), never from the chain
            continue
        node = next((chain[s] for s in inp.sources if s in chain), None)
        if node is not None:
            upstream[inp.role] = node
        elif inp.required:
            raise ValueError(f"stage {stage.name!r} needs its input {inp.role!r} from {' or '.join(inp.sources)}, "
                             f"which this method's graph does not hold (it holds {', '.join(chain) or 'nothing'})")
    return upstream


def build_plan(exp: Experiment, missing: list[str] | None = None) -> list[DatasetPlan]:
    """Resolve the experiment into stage nodes per dataset (no model is loaded).

    For each method, ``_method_specs`` decides which stages it uses and with which parameters;
    the nodes are then made in the stage table's order, each wired to its declared inputs
    (``wire``). ``missing``: collect missing weight files there instead of raising (see
    ``weights_identity``).
    """
    plans, index_nodes = [], {}  # banks first: the datasets' methods read their index
    for index, b in enumerate(exp.banks):
        if b.imported is not None:  # the authors' files, written by `ovseg bank import`: nothing to run
            index_nodes[b.name] = bank_graph.imported_index_node(exp, b)
            continue
        bank_plan, index_nodes[b.name] = _bank_plan(exp, b, index, missing)
        plans.append(bank_plan)
    for index, ds in enumerate(exp.datasets):
        spec = dataset_spec(ds)
        plan = DatasetPlan(ds, spec, index=index)
        resolved = [_resolve(exp, spec, m) for m in exp.methods]
        union: dict[tuple[str, P.WindowParams], set[str]] = {}  # methods sharing a window share one CLIP dump
        for r in resolved:
            union.setdefault((r.clip, r.window), set()).update(r.blocks)
        for r in resolved:
            variant = r.entry.classes or r.method.family
            lines = tuple(ds.classes) if ds.classes else tuple(class_lines(spec.name, variant))
            separator = ", " if ds.classes else CLASS_SEPARATORS[variant]  # each reference's own line reader
            specs = _method_specs(exp, ds, spec, r, tuple(sorted(union[(r.clip, r.window)])), lines, separator,
                                  missing)
            chain: dict[str, StageNode] = {}
            explicit: dict[str, dict[str, StageNode]] = {}  # upstream the chain cannot give (Input.explicit)
            if r.bank is not None:  # the bank's index node (in the bank's plan) wires into the reconstruction
                chain["bank_index"] = index_nodes[r.bank.bank]
                bank_graph.check_bank_user(r.entry, r.bank, r.clip, chain["bank_index"])
                aux = bank_graph.aux_clip(chain["bank_index"])
                if aux is not None:  # DMCE: the auxiliary CLIP's embeddings of the same vocabulary
                    text = specs["text_embeddings"].params
                    explicit["reconstruction"] = {"aux_text_embeddings": plan.add(make_node(
                        "text_embeddings", dataclasses.replace(text, backbone=aux),
                        weights={"clip": weights_identity(aux, exp.models.weights_dir, missing)}))}
            for name in STAGE_ORDER:
                if name in specs:
                    ns = specs[name]
                    upstream = {**wire(STAGES[name], chain), **explicit.get(name, {})}
                    node = make_node(name, ns.params, upstream, ns.weights, exp.persist)
                    if ns.inputs_dir is not None:
                        node = dataclasses.replace(node, inputs_dir=ns.inputs_dir)
                    chain[name] = plan.add(node)
            score = chain["scoring"]
            plan.methods.append(MethodPlan(r.entry, r.method, score.upstream["prediction"], score, spec.num_classes,
                                           class_names(list(lines), separator, spec, bool(ds.classes))))
        plans.append(plan)
    return plans


def _bank_plan(exp: Experiment, b: BankEntry, index: int, missing: list[str] | None) -> tuple[DatasetPlan, StageNode]:
    """A bank's plan (``flows.bank_graph``: its images' stages, one chain per CLIP) and its ``bank_index`` node."""
    wd = exp.models.weights_dir
    sam = _sam_spec(exp.model_copy(update={"regions": b.regions}) if b.regions else exp, wd, missing)
    specs = bank_graph.bank_node_specs(exp, b, sam, lambda name: weights_identity(name, wd, missing))
    ds = bank_graph.bank_dataset(b)
    plan, chains = DatasetPlan(ds, dataset_spec(ds), index=index, batch_size=bank_graph.bank_batch_size(exp, b)), {}
    persist = bank_graph.bank_persist(exp, b)
    for name in STAGE_ORDER:  # table order: every input is made before its readers
        for chain_name, ns in specs.get(name, ()):
            chain = chains.setdefault(chain_name, {})
            node = make_node(name, ns.params, wire(STAGES[name], chain), ns.weights, persist)
            chain[name] = plan.add(dataclasses.replace(node, inputs_dir=ns.inputs_dir))
    upstream = bank_graph.index_upstream(exp, b, chains)
    return plan, plan.add(make_node("bank_index", bank_graph.index_params(b, missing), upstream, None, persist))


def _method_specs(exp: Experiment, ds: DatasetEntry, spec: DatasetSpec, r: _Resolved, blocks: tuple[str, ...],
                  lines: tuple[str, ...], separator: str, missing: list[str] | None) -> dict[str, NodeSpec]:
    """The stages one method uses on one dataset, with their parameters and weights (in table order).

    ``blocks``: the CLIP aggregates every method sharing this method's CLIP and window needs.
    """
    wd, fdt, dt = exp.models.weights_dir, exp.feature_dtype, exp.dtype
    m, method, window, cfg = r.entry, r.method, r.window, r.config
    clip_id = {"clip": weights_identity(r.clip, wd, missing)}
    out = {"text_embeddings": NodeSpec(P.TextParams(r.clip, lines, separator, exp.text_templates, dt), clip_id),
           "clip_layers": NodeSpec(P.ClipParams(r.clip, window, blocks, fdt, dt), clip_id)}
    if method.uses_regions:
        out["sam_masks"] = _sam_spec(exp, wd, missing)
        if method.correlation == "vfm":  # CorrCLIPv2: one VFM map per image; no DINO, no mask clustering stage
            vfm = str(r.vfm)
            out["vfm_features"] = NodeSpec(P.VfmParams(vfm, exp.models.vfm_max_side, fdt, dt),
                                           {"vfm": weights_identity(vfm, wd, missing)})
        else:
            dino_input = "from_clip" if method.corrclip_config(cfg).padding == "reference" else "imagenet"
            out["dino_features"] = NodeSpec(P.DinoParams(exp.models.dino, window, fdt, dt, exp.models.dino_pos,
                                                         dino_input),
                                            {"dino": weights_identity(exp.models.dino, wd, missing)})
            out["mask_clustering"] = NodeSpec(P.ClusteringParams(window, method.clustering_config(cfg)))
        if method.semantic_stage(cfg):  # v1: over mask_clustering; v2: over sam_masks relabelled (relabel_config)
            out["mask_class_tokens"] = NodeSpec(P.SemanticParams(r.clip, window, fdt, dt,
                                                                 method.relabel_config(cfg)), clip_id)
    preset = spec.presets[method.family]
    preset_thd = preset.prob_thd
    if method.family == "scclip" and _geometry(r.clip)[0] == 24 and spec.name in SCCLIP_VITL_PROB_THD:
        preset_thd = SCCLIP_VITL_PROB_THD[spec.name]
    prob_thd = (m.prob_thd if m.prob_thd is not None else preset_thd) if spec.has_background else None
    area_thd = (m.area_thd if m.area_thd is not None else preset.area_thd) if spec.has_background else None
    out["reconstruction"] = NodeSpec(P.ReconstructionParams(
        method.name, method.reconstruction_config(cfg), r.clip, window, dt, float(m.logit_scale or preset.logit_scale),
        prob_thd, area_thd, r.bank), clip_id)
    if method.map_correction(cfg):
        out["map_correction"] = NodeSpec(P.MapCorrectionParams(method.corrclip_config(cfg).m0_quirk))
    out["scoring"] = NodeSpec(P.ScoringParams(spec.name, spec.num_classes, spec.label_conversion,
                                              _scored_ignore_index(ds, spec), ds.strict_labels))
    return out


def _scored_ignore_index(ds: DatasetEntry, spec: DatasetSpec) -> int:
    """The ground-truth value scoring ignores under the dataset's ``ignore_mode`` (``metrics.scoring_ignore_index``)."""
    if ds.ignore_mode == "unlabelled" and spec.unlabelled_index is None:
        raise ValueError(f"datasets[{ds.name}].ignore_mode: 'unlabelled' needs a dataset whose unlabelled value is "
                         f"not the evaluator's {spec.ignore_index} (ADE847, PC459); {spec.name} ignores "
                         f"{spec.ignore_index} already: remove the key")
    return scoring_ignore_index(spec.ignore_index, spec.unlabelled_index, ds.ignore_mode)


def experiment_keys(paths: Sequence[str], overrides: Sequence[str] = ()) -> set[tuple[str, str]]:
    """Every ``(stage, key)`` of the plans of the given experiment files (``ovseg cache gc / verify EXP``)."""
    keys: set[tuple[str, str]] = set()
    for path in paths:
        for plan in build_plan(load_experiment(path, overrides=overrides)):
            keys.update(n.ident for n in read_nodes(plan))
    return keys


def read_nodes(plan: DatasetPlan) -> list[StageNode]:
    """The plan's nodes in order, then the nodes outside it that they read (an imported bank's index and values)."""
    nodes, seen = plan.ordered(), set(plan.nodes)
    stack = [u for n in nodes for u in n.upstream.values()]
    while stack:
        n = stack.pop()
        if n.ident not in seen:
            seen.add(n.ident)
            nodes.append(n)
            stack.extend(n.upstream.values())
    return nodes


def _sam_spec(exp: Experiment, wd: str | None, missing: list[str] | None = None) -> NodeSpec:
    """The ``sam_masks`` node of the experiment's region source."""
    src, params = exp.regions.source, dict(exp.regions.params)
    try:
        if src in ("sam", "sam2"):
            name = exp.models.sam if src == "sam" else exp.models.sam2
            cfg: Any = (SamRegionConfig if src == "sam" else Sam2RegionConfig)(**params)
            return NodeSpec(P.RegionParams(src, name, cfg, exp.dtype), {src: weights_identity(name, wd, missing)})
        if src == "files":
            folder = params.pop("dir", None)
            if not folder:
                raise ValueError("regions.params.dir: the folder of the pre-generated masks is required for source files")
            cfg = RegionFileConfig(**params)
            try:
                digest = mask_files_digest(folder, cfg)
            except FileNotFoundError as e:
                if missing is None:
                    raise
                missing.append(f"regions: {e}")  # a dry run plans without the masks (a key no stored output has)
                digest = "missing"
            return NodeSpec(P.RegionParams(src, None, cfg, None, digest), inputs_dir=folder)
        cfg = SuperpixelConfig(method=src, **params)
    except TypeError as e:
        raise ValueError(f"regions.params: {e}") from e
    return NodeSpec(P.RegionParams(src, None, cfg, None))


def mask_files_digest(folder: str, cfg: Any) -> str:
    """sha256 over the name and bytes of every mask file in ``folder`` matching the pattern: edited masks
    change the ``sam_masks`` key and everything downstream is recomputed."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"regions.params.dir: mask folder {root} does not exist")
    h = hashlib.sha256()
    for path in sorted(root.glob(cfg.pattern.replace("{stem}", "*"))):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def descendants(plan: DatasetPlan, stages: set[str]) -> set[tuple[str, str]]:
    """Nodes of the named stages and every node downstream of them."""
    chosen = {n.ident for n in plan.nodes.values() if n.stage in stages}
    for n in plan.ordered():  # topological order: upstream nodes are decided first
        if any(u.ident in chosen for u in n.upstream.values()):
            chosen.add(n.ident)
    return chosen


def method_users(plan: DatasetPlan) -> dict[tuple[str, str], set[str]]:
    """For every node, the names of the methods whose results depend on it."""
    users: dict[tuple[str, str], set[str]] = {}
    for mp in plan.methods:
        stack = [mp.scoring]
        while stack:
            n = stack.pop()
            if mp.entry.name in users.setdefault(n.ident, set()):
                continue
            users[n.ident].add(mp.entry.name)
            stack.extend(n.upstream.values())
    return users
