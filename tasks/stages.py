"""The stage table: the only place a stage exists.

Like ``sam_model_registry``, ``STAGES`` maps each stage name to everything about it: the inputs
it declares (``Input``: a role, the stages that can fill it, required or not), its typed
parameters, its code version, the arrays each item stores, and its three steps (``models``
loaded once per worker, ``load`` one item's inputs, pure ``compute`` over a group of items).

The table is read, never restated:

- the graph (``flows.graph``) wires every node's upstream from ``Stage.inputs``;
- a stage's steps read exactly the inputs it declares (``StageContext.read_upstream`` /
  ``read_shared`` refuse any other role, naming the stage and the role);
- the executor stores exactly ``Stage.arrays`` per item (anything else fails the item);
- the CLI's stage choices, dry-run, ``cache ls``, the report and the benchmark iterate it.

The table's order is a topological order of the graph. Steps are named in full
(``Step("tasks.features:sam_load")``) and imported on first call, so a search for a step's
name finds the table, and reading the table costs no torch import.

Bump a stage's ``code_version`` when its output for the same inputs changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ovseg_core.names import did_you_mean
from tasks import bank_params as BP
from tasks import params as P

VOCAB_ITEM = "vocab"  # the one item of a per-vocabulary stage


class Step:
    """A stage step named in full, ``"tasks.features:sam_load"`` (module : function), imported on first call."""

    def __init__(self, ref: str):
        module, sep, name = ref.partition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"a step is named 'package.module:function', got {ref!r}")
        self.ref, self.module, self.name = ref, module, name
        self._fn: Callable | None = None

    def resolve(self) -> Callable:
        """The function itself (imports its module)."""
        if self._fn is None:
            self._fn = getattr(importlib.import_module(self.module), self.name)
        return self._fn

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)

    def __repr__(self) -> str:
        return f"Step({self.ref!r})"


@dataclass(frozen=True)
class Input:
    """One input a stage declares.

    Attributes:
        role: the name its steps read it by (``ctx.read_upstream(role, row)``) and its key is hashed under.
        sources: the stages whose output can fill it, in order of preference: the graph wires the
            first of them the method's graph holds (default: the stage named like the role).
        required: every node of the stage has it; False: wired only when the method's graph holds
            one of ``sources`` (reconstruction reads CorrCLIP's inputs only for CorrCLIP methods).
        explicit: never wired from the chain: the graph builder sets it (a second node of a stage the chain
            already holds for another role: DMCE's auxiliary CLIP vocabulary and values).
    """

    role: str
    sources: tuple[str, ...] = ()
    required: bool = True
    explicit: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            object.__setattr__(self, "sources", (self.role,))


class InputError(LookupError):
    """A step asked for an input its stage does not declare, or an optional input its node was not wired with."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def no_models(ctx: Any) -> None:
    """The ``models`` step of a stage that loads no network."""
    return None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: stage name (store folder, CLI choice, report label).
        description: one line for ``--help``, dry-run, ``cache ls`` and docs.
        per: ``"image"`` (one item per image), ``"vocabulary"`` (one item, id ``VOCAB_ITEM``) or ``"bank"``
            (one item per bank, id ``BANK_ITEM``, whose row lists the bank's readable images: ``bank_index``).
        inputs: the upstream outputs it reads, by role (see ``Input``).
        params: its typed parameter class (hashed into its key).
        code_version: bumped when its output for the same inputs changes.
        models: ``ctx -> models`` loaded once per worker (``no_models`` when it needs none).
        load: ``(ctx, manifest row) -> inputs`` (I/O only).
        compute: ``(ctx, models, [inputs]) -> [(arrays, attrs)]`` (pure ovseg_core calls).
        arrays: the names of the arrays each item stores, or ``params -> names`` when its
            parameters name them (clip_layers: one per block aggregate).
        windows: ``inputs -> window count`` for stages that batch windows (the executor's groups).
        scored_only: only images with ground truth are items.
    """

    name: str
    description: str
    per: str
    inputs: tuple[Input, ...]
    params: type
    code_version: str
    models: Callable[[Any], Any]
    load: Callable[[Any, Mapping[str, Any]], Any]
    compute: Callable[[Any, Any, Sequence[Any]], list[tuple[dict, dict]]]
    arrays: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    windows: Callable[[Any], int] | None = None
    scored_only: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(i.role for i in self.inputs)

    def input(self, role: str) -> Input:
        """The declared input ``role``; another role raises ``InputError`` naming the stage and its inputs."""
        for inp in self.inputs:
            if inp.role == role:
                return inp
        declared = ", ".join(self.roles) or "none"
        raise InputError(f"stage {self.name!r} reads input {role!r}{did_you_mean(role, self.roles)}, which it does "
                         f"not declare (its inputs: {declared}); declare it in the stage table (tasks/stages.py)")

    def array_names(self, params: Any) -> tuple[str, ...]:
        """The arrays each item of a node with ``params`` stores."""
        return tuple(self.arrays(params)) if callable(self.arrays) else self.arrays

    def items(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The stage's items among a dataset's manifest rows (images that can be read)."""
        if self.per == "vocabulary":
            return [{"image_id": VOCAB_ITEM}]
        if self.per == "bank":
            return [{"image_id": BP.BANK_ITEM, "images": sorted(str(r["image_id"]) for r in rows)}]
        if self.scored_only:  # images without ground truth are predicted, not scored
            return [dict(r) for r in rows if r.get("gt_path")]
        return [dict(r) for r in rows]

    def item_of(self, row: Mapping[str, Any]) -> str:
        """The id of this stage's item that an image's row needs (``VOCAB_ITEM`` for a per-vocabulary stage)."""
        if self.per == "bank":
            return BP.BANK_ITEM
        return VOCAB_ITEM if self.per == "vocabulary" else str(row["image_id"])


WINDOWS = Step("tasks.features:windows_of")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("text_embeddings", "prompt-ensembled query embeddings of a vocabulary", "vocabulary",
          inputs=(), params=P.TextParams, code_version="2",
          models=Step("tasks.features:text_models"), load=Step("tasks.features:text_load"),
          compute=Step("tasks.features:text_compute"), arrays=("embeddings", "query_to_class")),
    Stage("sam_masks", "region ids at original resolution (SAM automatic masks or superpixels)", "image",
          inputs=(), params=P.RegionParams, code_version="1",
          models=Step("tasks.features:sam_models"), load=Step("tasks.features:sam_load"),
          compute=Step("tasks.features:sam_compute"), arrays=("ids", "scores", "areas")),
    Stage("dino_features", "last-block DINO q+k of every window", "image",
          inputs=(), params=P.DinoParams, code_version="2",
          models=Step("tasks.features:dino_models"), load=Step("tasks.features:dino_load"),
          compute=Step("tasks.features:dino_compute"), arrays=("qk",), windows=WINDOWS),
    Stage("clip_layers", "CLIP block aggregates of every window", "image",
          inputs=(), params=P.ClipParams, code_version="1",
          models=Step("tasks.features:clip_models"), load=Step("tasks.features:clip_load"),
          compute=Step("tasks.features:clip_compute"), arrays=P.ClipParams.array_names, windows=WINDOWS),
    Stage("vfm_features", "a VFM's dense map of the whole original image at its token grid (CorrCLIPv2)", "image",
          inputs=(), params=P.VfmParams, code_version="1",
          models=Step("tasks.vfm:vfm_models"), load=Step("tasks.vfm:vfm_load"),
          compute=Step("tasks.vfm:vfm_compute"), arrays=("features",)),
    Stage("mask_clustering", "DBSCAN-merged region ids per window on the DINO grid", "image",
          inputs=(Input("dino_features"), Input("sam_masks")), params=P.ClusteringParams, code_version="2",
          models=no_models, load=Step("tasks.corrclip:clustering_load"),
          compute=Step("tasks.corrclip:clustering_compute"), arrays=("merged",)),
    Stage("mask_class_tokens", "CorrCLIP semantic-branch tokens per window", "image",
          # the regions the tokens pool over: v1 the merged map of mask_clustering; CorrCLIPv2 (no such
          # stage) sam_masks, relabelled on the correlation grid (SemanticParams.relabel). One role, so v1's
          # keys (which hash the role name) stay.
          inputs=(Input("mask_clustering", ("mask_clustering", "sam_masks")),), params=P.SemanticParams,
          code_version="1",
          models=Step("tasks.corrclip:semantic_models"), load=Step("tasks.corrclip:semantic_load"),
          compute=Step("tasks.corrclip:semantic_compute"), arrays=("semantic",), windows=WINDOWS),
    # memory banks (CorrCLIPv2 VISR + DMCE; flows.bank_graph): per bank image, then the whole bank
    Stage("bank_values", "a memory bank's per-region CorrCLIP values of one image (one node per CLIP)", "image",
          inputs=(Input("clip_layers"), Input("dino_features"), Input("sam_masks"), Input("mask_clustering"),
                  Input("mask_class_tokens", required=False)),
          params=BP.BankValuesParams, code_version="1",
          models=Step("tasks.reconstruction:reconstruction_models"), load=Step("tasks.bank:values_load"),
          compute=Step("tasks.bank:values_compute"), arrays=("values", "mask_ids", "areas"), windows=WINDOWS),
    Stage("bank_keys", "a memory bank's per-region VFM keys of one image", "image",
          inputs=(Input("vfm_features"), Input("sam_masks")), params=BP.BankKeysParams, code_version="1",
          models=no_models, load=Step("tasks.bank:keys_load"), compute=Step("tasks.bank:keys_compute"),
          arrays=("keys", "mask_ids", "areas")),
    Stage("bank_index", "a memory bank's FAISS index over every region key, its region registry, and its values in "
          "region-id order (row segments)", "bank",
          # values: read by the methods that retrieve (through this node: its key covers them)
          inputs=(Input("bank_keys"), Input("bank_values"),
                  Input("bank_aux_values", ("bank_values",), required=False, explicit=True)),
          params=BP.BankIndexParams, code_version="1",
          models=no_models, load=Step("tasks.bank_index:index_load"), compute=Step("tasks.bank_index:index_compute"),
          arrays=BP.BankIndexParams.array_names),
    Stage("reconstruction", "a method's label map and winning probability", "image",
          inputs=(Input("text_embeddings"), Input("clip_layers"),
                  # CorrCLIP's inputs: wired for the methods whose graph holds them (Method.uses_regions;
                  # vfm_features for Method.correlation == "vfm", dino_features / mask_clustering for "dino_qk")
                  Input("dino_features", required=False), Input("vfm_features", required=False),
                  Input("sam_masks", required=False),
                  Input("mask_clustering", required=False),
                  Input("mask_class_tokens", required=False),  # the semantic branch
                  # CorrCLIPv2's memory bank (ReconstructionParams.bank) and DMCE's auxiliary CLIP vocabulary
                  Input("bank_index", required=False),
                  Input("aux_text_embeddings", ("text_embeddings",), required=False, explicit=True)),
          params=P.ReconstructionParams, code_version="2",
          models=Step("tasks.reconstruction:reconstruction_models"),
          load=Step("tasks.reconstruction:reconstruction_load"),
          compute=Step("tasks.reconstruction:reconstruction_compute"), arrays=("labels", "prob"), windows=WINDOWS),
    Stage("map_correction", "CorrCLIP map correction (region-mode labels)", "image",
          inputs=(Input("reconstruction"), Input("sam_masks")), params=P.MapCorrectionParams, code_version="1",
          models=no_models, load=Step("tasks.corrclip:correction_load"),
          compute=Step("tasks.corrclip:correction_compute"), arrays=("labels", "prob")),
    Stage("scoring", "per-image confusion matrix against the ground truth", "image",
          inputs=(Input("prediction", ("map_correction", "reconstruction")),),  # the method's final labels
          params=P.ScoringParams, code_version="2",
          models=no_models, load=Step("tasks.scoring:scoring_load"), compute=Step("tasks.scoring:scoring_compute"),
          arrays=("confusion",), scored_only=True),
)}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


def _check_table(stages: Mapping[str, Stage]) -> None:
    """Every input is filled by stages listed before its reader (the order is topological); roles are unique."""
    seen: list[str] = []
    for name, stage in stages.items():
        if len(set(stage.roles)) != len(stage.roles):
            raise ValueError(f"stage {name!r} declares a role twice: {stage.roles}")
        for inp in stage.inputs:
            late = [s for s in inp.sources if s not in seen]
            if late:
                raise ValueError(f"stage {name!r} input {inp.role!r}: source(s) {late} are not stages listed before it")
        seen.append(name)


_check_table(STAGES)


def get_stage(name: str) -> Stage:
    """The stage ``name``; an unknown name raises ``ValueError`` listing the stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}{did_you_mean(name, STAGE_ORDER)}; stages are: "
                         f"{', '.join(STAGE_ORDER)}") from None


BANK_STORED: tuple[str, ...] = ("sam_masks", "bank_values", "bank_keys")  # a bank's per-image outputs: always stored
# (the experiment's persist may drop sam_masks for its datasets; a bank stores its regions all the same)


def check_persist(persist: dict[str, bool], bank: bool = False) -> dict[str, bool]:
    """An experiment's ``persist`` (``bank``: a bank's ``banks[].persist``), checked: only per-image stages may be
    left unstored (``false``), never ``scoring``, nor a bank's regions, values and keys; unknown stages are errors."""
    never = ("scoring", *(BANK_STORED if bank else BANK_STORED[1:]))  # a bank's regions: optional for a dataset
    for name, keep in persist.items():
        stage = get_stage(name)  # an unknown name is an error either way
        if not keep and (stage.per != "image" or name in never):
            may = ", ".join(s for s, st in STAGES.items() if st.per == "image" and s not in never)
            what = ("a bank's regions, values, keys and index" if bank
                    else "scores, per-vocabulary outputs and a bank's values, keys and index")
            raise ValueError(f"{name} must be persisted: {what} are always stored; stages that may be computed on "
                             f"demand: {may}")
    return persist
