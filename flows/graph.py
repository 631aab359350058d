"""The stage graph of an experiment: which stages, with which parameters and keys.

For every dataset and method the graph resolves the dataset preset (resize, window, logit
scale, thresholds), the method config and the backbones into stage keys, chained through
their upstream keys. Identical keys across methods are one node: a sweep over CorrCLIP's TAU
shares its SAM masks, DINO features, CLIP dumps, clustering and mask class tokens.

Stages (upstream in brackets):
- ``text_embeddings`` (-): per vocabulary (item ``vocab``).
- ``sam_masks`` (-): region ids at original resolution (SAM or superpixels).
- ``dino_features`` (-): last-block q+k per window.
- ``clip_layers`` (-): CLIP block aggregates per window (union of what the methods sharing a
  window plan need).
- ``mask_clustering`` (dino_features, sam_masks): merged region ids per window on the DINO grid.
- ``mask_class_tokens`` (mask_clustering): CorrCLIP semantic-branch tokens per window.
- ``reconstruction`` (text_embeddings, clip_layers, [dino_features, sam_masks, mask_clustering,
  mask_class_tokens]): label map + winning probability at original resolution.
- ``map_correction`` (reconstruction, sam_masks): CorrCLIP's region-mode correction.
- ``scoring`` (the final prediction stage): per-image confusion matrix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flows.config import DatasetEntry, Experiment, MethodEntry
from ovseg_core.datasets import DatasetSpec, class_lines, get_dataset
from storage.keys import StageKey
from tasks.runtime import StageSpec

# Explicit per-stage code versions: bump when a stage's output for the same inputs changes.
CODE_VERSIONS: Mapping[str, str] = {
    "text_embeddings": "1",
    "sam_masks": "1",
    "dino_features": "1",
    "clip_layers": "1",
    "mask_clustering": "1",
    "mask_class_tokens": "1",
    "reconstruction": "1",
    "map_correction": "1",
    "scoring": "1",
}
STAGE_ORDER = tuple(CODE_VERSIONS)
PER_VOCABULARY = frozenset({"text_embeddings"})
# SC-CLIP with ViT-L/14 uses other background thresholds (methods.md section 3).
SCCLIP_VITL_PROB_THD: Mapping[str, float] = {"VOC21": 0.2, "COCO-Object": 0.25}
CORRCLIP_PAD_MULTIPLE = 56  # lcm(8, 14): DINO /8 and CLIP /14 and /16 grids all fit (methods.md 2.1)


# A node of the stage graph: one stage output set to produce for one dataset.
StageNode = StageSpec


@dataclass(frozen=True)
class MethodPlan:
    """The nodes that produce one method's predictions and scores on one dataset."""

    method: MethodEntry
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

    def add(self, node: StageNode) -> StageNode:
        self.nodes.setdefault((node.stage, node.key), node)
        return self.nodes[(node.stage, node.key)]

    def ordered(self) -> list[StageNode]:
        """Nodes sorted by stage order (a topological order of the graph)."""
        return sorted(self.nodes.values(), key=lambda n: (STAGE_ORDER.index(n.stage), n.key))


def dataset_spec(ds: DatasetEntry) -> DatasetSpec:
    """The dataset's spec; with a custom vocabulary, the spec's presets (default VOC20's) with its class count."""
    base = get_dataset(ds.spec or "VOC20")
    if not ds.classes:
        return base
    presets = {k: dataclasses.replace(p, prob_thd=p.prob_thd if ds.background else None,
                                      area_thd=p.area_thd if ds.background else None) for k, p in base.presets.items()}
    return DatasetSpec(name=ds.spec or "custom", num_classes=len(ds.classes), has_background=ds.background,
                       reduce_zero_label=False, presets=presets, class_files=dict(base.class_files), label_conversion="none")


def method_family(method: str) -> str:
    """Preset and class-file family of a method: CorrCLIP presets for corrclip*, SC-CLIP's for the rest."""
    return "corrclip" if method.startswith("corrclip") else "scclip"


def weights_identity(name: str, weights_dir: str | None) -> dict[str, Any]:
    """Identity of a backbone's weights for stage keys, without building the model."""
    from ovseg_core.backbones import weights_identity as _wid

    return _wid(name, weights_dir=weights_dir)


def method_config(entry: MethodEntry, num_blocks: int):
    """The frozen method config of an entry (validated; errors name the field)."""
    params = dict(entry.params)
    if entry.method == "corrclip":
        from ovseg_core.corrclip.config import CorrCLIPConfig

        if entry.map_correction is not None:
            params["map_correction"] = entry.map_correction
        return _build(CorrCLIPConfig, params, entry)
    if entry.method == "scclip":
        from ovseg_core.scclip.config import SCCLIPConfig

        return _build(SCCLIPConfig, params, entry).resolved(num_blocks)
    if entry.method == "corrclip+scclip":
        from ovseg_core.combined import CombinedConfig
        from ovseg_core.corrclip.config import CorrCLIPConfig

        corr = {k: v for k, v in params.items() if k != "scclip"}
        if entry.map_correction is not None:
            corr["map_correction"] = entry.map_correction
        return (_build(CorrCLIPConfig, corr, entry), _build(CombinedConfig, dict(params.get("scclip", {})), entry))
    if params:
        raise ValueError(f"method {entry.name!r} ({entry.method}) takes no params, got {sorted(params)}")
    return None


def _build(cls, params: Mapping[str, Any], entry: MethodEntry):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(
            f"methods[{entry.name}].params: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}"
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"methods[{entry.name}].params: {e}") from e


def required_blocks(entry: MethodEntry, cfg, num_blocks: int) -> tuple[str, ...]:
    """CLIP aggregates a method reads from ``clip_layers``."""
    if entry.method == "corrclip":
        from ovseg_core.corrclip.config import required_blocks as rb

        return tuple(rb(cfg, num_blocks))
    if entry.method == "corrclip+scclip":
        from ovseg_core.combined import combined_required_blocks
        from ovseg_core.corrclip.config import required_blocks as rb

        return tuple(sorted(set(rb(cfg[0], num_blocks)) | set(combined_required_blocks(cfg[1], num_blocks))))
    if entry.method == "scclip":
        from ovseg_core.scclip.pipeline import required_blocks as rb

        return tuple(rb(cfg, num_blocks))
    from ovseg_core.baselines import baseline_required_blocks

    return tuple(baseline_required_blocks(entry.method, num_blocks))


def clip_num_blocks(name: str) -> int:
    """Number of transformer blocks of a CLIP backbone, without loading weights."""
    from ovseg_core.backbones import num_blocks

    return num_blocks(name)


def clip_patch_size(name: str) -> int:
    """Patch size of a CLIP backbone, without loading weights."""
    from ovseg_core.backbones import patch_size

    return patch_size(name)


def config_dict(cfg) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, tuple):
        return [dataclasses.asdict(c) for c in cfg]
    return dataclasses.asdict(cfg)


def build_plan(exp: Experiment) -> list[DatasetPlan]:
    """Resolve the experiment into stage nodes per dataset (no model is loaded)."""
    plans = []
    wd = exp.models.weights_dir
    fdt = exp.feature_dtype
    common = {"device": exp.device, "dtype": exp.dtype}
    extra = {"window_batch": exp.window_batch, "weights_dir": wd}
    for ds in exp.datasets:
        spec = dataset_spec(ds)
        plan = DatasetPlan(ds, spec)
        # resolve each method first: window, config, blocks
        resolved = []
        for m in exp.methods:
            clip_name = m.clip or exp.models.clip
            nb = clip_num_blocks(clip_name)
            family = method_family(m.method)
            preset = spec.presets[family]
            pad = CORRCLIP_PAD_MULTIPLE if family == "corrclip" else clip_patch_size(clip_name)
            window = {
                "short_side": m.window.short_side or preset.short_side,
                "crop": m.window.crop or preset.crop,
                "stride": m.window.stride or preset.stride,
                "pad_multiple": pad,
            }
            cfg = method_config(m, nb)
            resolved.append((m, clip_name, nb, family, preset, window, cfg, required_blocks(m, cfg, nb)))
        # union of blocks per (clip, window) so methods sharing a window share one dump
        union: dict[tuple, set[str]] = {}
        for m, clip_name, nb, family, preset, window, cfg, blocks in resolved:
            union.setdefault((clip_name, tuple(sorted(window.items()))), set()).update(blocks)

        for m, clip_name, nb, family, preset, window, cfg, blocks in resolved:
            clip_id = weights_identity(clip_name, wd)
            variant = m.classes or family
            lines = list(ds.classes) if ds.classes else class_lines(spec.name, variant)
            text = plan.add(StageNode(StageKey(
                "text_embeddings",
                {"backbone": clip_name, "classes": lines, "templates": exp.text_templates, "dtype": exp.dtype},
                {}, CODE_VERSIONS["text_embeddings"], {"clip": clip_id}), **common, extra=extra))
            clip = plan.add(StageNode(StageKey(
                "clip_layers",
                {"backbone": clip_name, "window": window, "feature_dtype": fdt, "dtype": exp.dtype,
                 "blocks": sorted(union[(clip_name, tuple(sorted(window.items())))])},
                {}, CODE_VERSIONS["clip_layers"], {"clip": clip_id}), **common, extra=extra))
            upstream = {"text_embeddings": text.stage_key, "clip_layers": clip.stage_key}
            sam = None
            if family == "corrclip":
                sam = plan.add(_sam_node(exp, wd, common, extra))
                dino_name = exp.models.dino
                dino = plan.add(StageNode(StageKey(
                    "dino_features",
                    {"backbone": dino_name, "window": window, "feature_dtype": fdt, "dtype": exp.dtype},
                    {}, CODE_VERSIONS["dino_features"], {"dino": weights_identity(dino_name, wd)}), **common, extra=extra))
                corr_cfg = cfg[0] if isinstance(cfg, tuple) else cfg
                clustering = {k: getattr(corr_cfg, k) for k in ("mask_clustering", "dbscan_eps", "dbscan_min_samples", "m0_quirk")}
                mc = plan.add(StageNode(StageKey(
                    "mask_clustering", {"window": window, "clustering": clustering},
                    {"dino_features": dino.stage_key.key, "sam_masks": sam.stage_key.key},
                    CODE_VERSIONS["mask_clustering"]),
                    upstream={"dino_features": dino.stage_key, "sam_masks": sam.stage_key}, **common, extra=extra))
                upstream.update({"dino_features": dino.stage_key, "sam_masks": sam.stage_key, "mask_clustering": mc.stage_key})
                if corr_cfg.semantic_branch:
                    mct = plan.add(StageNode(StageKey(
                        "mask_class_tokens", {"backbone": clip_name, "window": window, "feature_dtype": fdt, "dtype": exp.dtype},
                        {"mask_clustering": mc.stage_key.key}, CODE_VERSIONS["mask_class_tokens"], {"clip": clip_id}),
                        upstream={"mask_clustering": mc.stage_key, "sam_masks": sam.stage_key}, **common, extra=extra))
                    upstream["mask_class_tokens"] = mct.stage_key
            logit_scale = m.logit_scale or preset.logit_scale
            preset_thd = preset.prob_thd
            if family == "scclip" and nb == 24 and spec.name in SCCLIP_VITL_PROB_THD:
                preset_thd = SCCLIP_VITL_PROB_THD[spec.name]
            prob_thd = (m.prob_thd if m.prob_thd is not None else preset_thd) if spec.has_background else None
            area_thd = (m.area_thd if m.area_thd is not None else preset.area_thd) if spec.has_background else None
            rec = plan.add(StageNode(StageKey(
                "reconstruction",
                {"method": m.method, "config": config_dict(cfg), "backbone": clip_name, "window": window, "dtype": exp.dtype,
                 "logit_scale": logit_scale, "prob_thd": prob_thd, "area_thd": area_thd},
                {k: v.key for k, v in upstream.items()}, CODE_VERSIONS["reconstruction"], {"clip": clip_id}),
                upstream=upstream, **common, extra=extra))
            pred = rec
            corr_cfg = cfg[0] if isinstance(cfg, tuple) else cfg
            if family == "corrclip" and corr_cfg.map_correction:
                pred = plan.add(StageNode(StageKey(
                    "map_correction", {"m0_quirk": corr_cfg.m0_quirk},
                    {"reconstruction": rec.key, "sam_masks": sam.key}, CODE_VERSIONS["map_correction"]),
                    upstream={"reconstruction": rec.stage_key, "sam_masks": sam.stage_key}, **common, extra=extra))
            score = plan.add(StageNode(StageKey(
                "scoring",
                {"spec": spec.name, "num_classes": spec.num_classes, "conversion": spec.label_conversion,
                 "ignore_index": spec.ignore_index},
                {"prediction": pred.key}, CODE_VERSIONS["scoring"]),
                upstream={"prediction": pred.stage_key}, **common, extra=extra))
            from ovseg_core.features.text import parse_class_lines

            names = parse_class_lines(lines).class_names
            plan.methods.append(MethodPlan(m, pred, score, spec.num_classes, tuple(names)))
        plans.append(plan)
    return plans


def _sam_node(exp: Experiment, wd: str | None, common: Mapping[str, Any], extra: Mapping[str, Any]) -> StageNode:
    from ovseg_core.features.regions import SamRegionConfig, SuperpixelConfig

    src = exp.regions.source
    if src == "sam":
        try:
            cfg = SamRegionConfig(**exp.regions.params)
        except TypeError as e:
            raise ValueError(f"regions.params: {e}") from e
        params = {"source": "sam", "backbone": exp.models.sam, "config": dataclasses.asdict(cfg), "dtype": exp.dtype}
        weights = {"sam": weights_identity(exp.models.sam, wd)}
    else:
        try:
            cfg = SuperpixelConfig(method=src, **exp.regions.params)
        except TypeError as e:
            raise ValueError(f"regions.params: {e}") from e
        params = {"source": src, "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "method"}}
        weights = None
    return StageNode(StageKey("sam_masks", params, {}, CODE_VERSIONS["sam_masks"], weights), **common, extra=extra)
