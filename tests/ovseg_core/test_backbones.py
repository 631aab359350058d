"""Backbone registry: name parsing, official files, tiny/random builds, identity, device and dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU, VisionTransformer
from segment_anything import SamAutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from segment_anything.modeling import Sam

from ovseg_core import clip_ops
from ovseg_core.backbones.builders import build_model
from ovseg_core.backbones import (
    Backbone,
    BackboneSpec,
    list_backbones,
    load_backbone,
    num_blocks,
    official_weight_file,
    parse_backbone,
    patch_size,
    weights_identity,
)

REQUIRED = [
    "clip:ViT-B-16@openai",
    "clip:ViT-B-16-quickgelu@metaclip_fullcc",
    "clip:ViT-L-14@openai",
    "clip:ViT-L-14-quickgelu@metaclip_fullcc",
    "clip:ViT-H-14@laion2b_s32b_b79k",
    "clip:ViT-B-16@dfn2b",
    "dino:vitb8",
    "dino:vits8",
    "dino:vits16",
    "dino:vitb16",
    "sam:vit_b",
    "sam:vit_l",
    "sam:vit_h",
    "sam2:hiera_t",
    "sam2:hiera_s",
    "sam2:hiera_b+",
    "sam2:hiera_l",
    "vfm:radiov3_l",
    "vfm:dinov2_l14_reg4",
    "vfm:dinov3_l16",
    "vfm:pe_spatial_l14_448",
    "clip:tiny",
    "dino:tiny8",
    "dino:tiny16",
    "sam:tiny",
    "sam2:tiny",
    "vfm:tiny_radiov3",
    "vfm:tiny_dinov2",
    "vfm:tiny_dinov3",
    "vfm:tiny_pe",
]
TINY = ["clip:tiny", "dino:tiny8", "dino:tiny16", "sam:tiny", "sam2:tiny", "vfm:tiny_radiov3", "vfm:tiny_dinov2",
        "vfm:tiny_dinov3", "vfm:tiny_pe"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- names ----------------------------------------------------------------------------------


def test_list_backbones_holds_every_required_name():
    assert list_backbones() == REQUIRED


@pytest.mark.parametrize(
    "name",
    REQUIRED
    + [
        "clip:ViT-B-16",
        "clip:ViT-B-16@random",
        "clip:ViT-B-16@random:7",
        "dino:vitb8@official",
        "sam:vit_h@random:3",
        "sam2:hiera_l@sam2.1",
        "sam2:hiera_b+@random:2",
        "clip:tiny@random:5",
        "dino:tiny16@/weights/tiny.pth",
        "clip:ViT-B-16@/w/ViT-B-16.pt",
    ],
)
def test_canonical_name_round_trips(name):
    spec = parse_backbone(name)
    assert parse_backbone(spec.name) == spec


@pytest.mark.parametrize(
    "name, family, arch, weights, seed",
    [
        ("clip:ViT-B-16", "clip", "ViT-B-16", "openai", 0),
        ("clip:ViT-B-16-quickgelu", "clip", "ViT-B-16-quickgelu", "metaclip_fullcc", 0),
        ("clip:ViT-B-16@OpenAI", "clip", "ViT-B-16", "openai", 0),
        ("clip:ViT-H-14@laion2b-s32b-b79k", "clip", "ViT-H-14", "laion2b_s32b_b79k", 0),
        ("dino:vitb8", "dino", "vitb8", "official", 0),
        ("sam:vit_b@random", "sam", "vit_b", "random", 0),
        ("sam:vit_b@random:12", "sam", "vit_b", "random", 12),
        ("clip:tiny", "clip", "tiny", "random", 0),
        ("dino:tiny8@random:4", "dino", "tiny8", "random", 4),
        ("dino:vits16@/w/dino_deitsmall16_pretrain.pth", "dino", "vits16", "/w/dino_deitsmall16_pretrain.pth", 0),
        ("sam:tiny@sam_tiny.pth", "sam", "tiny", "sam_tiny.pth", 0),
        ("vfm:radiov3_l", "vfm", "radiov3_l", "official", 0),
        ("vfm:dinov3_l16@random:2", "vfm", "dinov3_l16", "random", 2),
        ("vfm:tiny_pe", "vfm", "tiny_pe", "random", 0),
        ("vfm:radiov3_l@/w/model.safetensors", "vfm", "radiov3_l", "/w/model.safetensors", 0),
    ],
)
def test_parse_fields(name, family, arch, weights, seed):
    spec = parse_backbone(name)
    assert (spec.family, spec.arch, spec.weights, spec.seed) == (family, arch, weights, seed)
    assert spec.is_random == (weights == "random")
    assert spec.is_local_file == ("/" in weights or weights.endswith(".pth"))


def test_canonical_names_of_short_forms():
    assert parse_backbone("clip:ViT-B-16").name == "clip:ViT-B-16@openai"
    assert parse_backbone("dino:vitb8@official").name == "dino:vitb8"
    assert parse_backbone("clip:tiny").name == "clip:tiny@random:0"
    assert parse_backbone("sam:vit_b@random:3").name == "sam:vit_b@random:3"


@pytest.mark.parametrize("name", ["clip:ViT-B-99@openai", "dinov2:vitb14", "clip", "sam:vit_x", "", "ViT-B-16"])
def test_unknown_name_lists_valid_names(name):
    with pytest.raises(ValueError, match=r"unknown backbone.*valid names: clip:ViT-B-16@openai, .*dino:vitb8.*sam:tiny"):
        parse_backbone(name)


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ValueError, match=r"weights for clip:ViT-B-16 must be one of .*'openai'.*got 'nonsense'"):
        parse_backbone("clip:ViT-B-16@nonsense")
    with pytest.raises(ValueError, match=r"weights for dino:vitb8 must be one of \['official', 'random'\]"):
        parse_backbone("dino:vitb8@openai")


@pytest.mark.parametrize(
    "name, message",
    [
        ("sam:vit_b@random:x", r"seed .* must be an integer >= 0"),
        ("sam:vit_b@random:-1", r"seed .* must be an integer >= 0"),
        ("clip:tiny@openai", r"tiny configuration clip:tiny must be 'random' or a local checkpoint path"),
        ("clip:tiny@", r"empty weights part"),
    ],
)
def test_bad_weights_part(name, message):
    with pytest.raises(ValueError, match=message):
        parse_backbone(name)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a string"):
        parse_backbone(None)  # type: ignore[arg-type]


def test_spec_validates_fields():
    with pytest.raises(ValueError, match="family must be one of"):
        BackboneSpec(family="dinov2", arch="vitb8", weights="official")
    with pytest.raises(ValueError, match="arch for family 'dino' must be one of"):
        BackboneSpec(family="dino", arch="vit_b", weights="official")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        BackboneSpec(family="dino", arch="vitb8", weights="random", seed=-2)
    with pytest.raises(ValueError, match="weights must be a non-empty string"):
        BackboneSpec(family="dino", arch="vitb8", weights="")


# --- official files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, file, url_part",
    [
        ("clip:ViT-B-16@openai", "ViT-B-16.pt", "openaipublic.azureedge.net/clip/models/"),
        ("clip:ViT-B-16-quickgelu@metaclip_fullcc", "b16_fullcc2.5b.pt", "dl.fbaipublicfiles.com/MMPT/metaclip/"),
        ("clip:ViT-L-14@openai", "ViT-L-14.pt", "openaipublic.azureedge.net/clip/models/"),
        ("clip:ViT-L-14-quickgelu@metaclip_fullcc", "l14_fullcc2.5b.pt", "dl.fbaipublicfiles.com/MMPT/metaclip/"),
        (
            "clip:ViT-H-14@laion2b_s32b_b79k",
            "CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_pytorch_model.bin",
            "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/",
        ),
        ("clip:ViT-B-16@dfn2b", "DFN2B-CLIP-ViT-B-16/open_clip_pytorch_model.bin",
         "huggingface.co/apple/DFN2B-CLIP-ViT-B-16/"),
        ("dino:vitb8", "dino_vitbase8_pretrain.pth", "dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/"),
        ("dino:vits8", "dino_deitsmall8_pretrain.pth", "dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/"),
        ("dino:vits16", "dino_deitsmall16_pretrain.pth", "dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"),
        ("dino:vitb16", "dino_vitbase16_pretrain.pth", "dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"),
        ("sam:vit_b", "sam_vit_b_01ec64.pth", "dl.fbaipublicfiles.com/segment_anything/"),
        ("sam:vit_l", "sam_vit_l_0b3195.pth", "dl.fbaipublicfiles.com/segment_anything/"),
        ("sam:vit_h", "sam_vit_h_4b8939.pth", "dl.fbaipublicfiles.com/segment_anything/"),
        ("sam2:hiera_t", "sam2_hiera_tiny.pt", "dl.fbaipublicfiles.com/segment_anything_2/072824/"),
        ("sam2:hiera_s", "sam2_hiera_small.pt", "dl.fbaipublicfiles.com/segment_anything_2/072824/"),
        ("sam2:hiera_b+", "sam2_hiera_base_plus.pt", "dl.fbaipublicfiles.com/segment_anything_2/072824/"),
        ("sam2:hiera_l", "sam2_hiera_large.pt", "dl.fbaipublicfiles.com/segment_anything_2/072824/"),
        ("sam2:hiera_t@sam2.1", "sam2.1_hiera_tiny.pt", "dl.fbaipublicfiles.com/segment_anything_2/092824/"),
        ("sam2:hiera_s@sam2.1", "sam2.1_hiera_small.pt", "dl.fbaipublicfiles.com/segment_anything_2/092824/"),
        ("sam2:hiera_b+@sam2.1", "sam2.1_hiera_base_plus.pt", "dl.fbaipublicfiles.com/segment_anything_2/092824/"),
        ("sam2:hiera_l@sam2.1", "sam2.1_hiera_large.pt", "dl.fbaipublicfiles.com/segment_anything_2/092824/"),
        ("vfm:radiov3_l", "c-radio-v3_l_half.pth.tar", "huggingface.co/nvidia/C-RADIOv3-L/resolve/main/"),
        ("vfm:dinov2_l14_reg4", "dinov2_vitl14_reg4_pretrain.pth", "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"),
        ("vfm:dinov3_l16", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "dl.fbaipublicfiles.com/dinov3/"),
        ("vfm:pe_spatial_l14_448", "PE-Spatial-L14-448.pt", "huggingface.co/facebook/PE-Spatial-L14-448/"),
    ],
)
def test_official_weight_files(name, file, url_part):
    got_file, url = official_weight_file(name)
    assert got_file == file
    assert url_part in url and url.startswith("https://")


@pytest.mark.parametrize("name", ["clip:tiny", "sam:vit_b@random", "dino:vitb8@/w/x.pth"])
def test_no_official_file_for_random_tiny_or_local(name):
    with pytest.raises(ValueError, match="has no official weight file"):
        official_weight_file(name)


# --- tiny and random builds -----------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_are_frozen_eval_models_with_identity(name):
    rng_before = torch.get_rng_state()
    bb = load_backbone(name)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not consume the global RNG"
    assert isinstance(bb, Backbone)
    assert not bb.model.training and all(not m.training for m in bb.model.modules())
    assert not any(p.requires_grad for p in bb.model.parameters())
    assert all(p.dtype == torch.float32 for p in bb.model.parameters())
    assert bb.identity == {
        "name": f"{name}@random:0",
        "family": bb.spec.family,
        "arch": bb.spec.arch,
        "weights": "random",
        "random": True,
        "seed": 0,
        "file": None,
        "sha256": None,
        "sha256_scope": None,
    }
    assert json.loads(json.dumps(bb.identity)) == bb.identity


@pytest.mark.parametrize(
    "name, cls, patch, blocks",
    [
        ("clip:tiny", CLIP, 16, 12),
        ("dino:tiny8", timm.models.vision_transformer.VisionTransformer, 8, 2),
        ("dino:tiny16", timm.models.vision_transformer.VisionTransformer, 16, 2),
        ("sam:tiny", Sam, 16, 2),
        ("sam2:tiny", SAM2Base, 16, 5),
        ("vfm:tiny_radiov3", timm.models.naflexvit.NaFlexVit, 16, 2),
        ("vfm:tiny_dinov2", timm.models.vision_transformer.VisionTransformer, 14, 2),
        ("vfm:tiny_dinov3", timm.models.eva.Eva, 16, 2),
        ("vfm:tiny_pe", timm.models.eva.Eva, 14, 2),
    ],
)
def test_tiny_classes_and_geometry(name, cls, patch, blocks):
    bb = load_backbone(name)
    assert type(bb.model) is cls
    assert (bb.patch_size, bb.num_blocks) == (patch, blocks)
    assert (bb.tokenizer is not None) == (bb.spec.family == "clip")


@pytest.mark.parametrize(
    "name, patch, blocks",
    [
        ("clip:ViT-B-16@openai", 16, 12),
        ("clip:ViT-B-16-quickgelu@metaclip_fullcc", 16, 12),
        ("clip:ViT-L-14@openai", 14, 24),
        ("clip:ViT-L-14-quickgelu@metaclip_fullcc", 14, 24),
        ("clip:ViT-H-14@laion2b_s32b_b79k", 14, 32),
        ("dino:vitb8", 8, 12),
        ("dino:vits8", 8, 12),
        ("dino:vits16", 16, 12),
        ("dino:vitb16", 16, 12),
        ("sam:vit_b", 16, 12),
        ("sam:vit_l", 16, 24),
        ("sam:vit_h", 16, 32),
        ("clip:tiny", 16, 12),
        ("dino:tiny8", 8, 2),
        ("dino:tiny16", 16, 2),
        ("sam:tiny@random:4", 16, 2),
        ("sam2:hiera_t", 16, 12),
        ("sam2:hiera_s", 16, 16),
        ("sam2:hiera_b+@sam2.1", 16, 24),
        ("sam2:hiera_l", 16, 48),
        ("sam2:tiny", 16, 5),
        ("vfm:radiov3_l", 16, 24),
        ("vfm:dinov2_l14_reg4", 14, 24),
        ("vfm:dinov3_l16", 16, 24),
        ("vfm:pe_spatial_l14_448", 14, 24),
        ("vfm:tiny_pe@random:3", 14, 2),
    ],
)
def test_geometry_without_weights(name, patch, blocks):
    assert (patch_size(name), num_blocks(name)) == (patch, blocks)


def test_geometry_matches_the_built_model():
    for name in TINY:
        bb = load_backbone(name)
        assert (bb.patch_size, bb.num_blocks) == (patch_size(name), num_blocks(name))


@pytest.mark.parametrize("name", TINY + ["sam:vit_b@random:2"])
def test_weights_identity_without_building(name):
    spec = parse_backbone(name)
    assert weights_identity(name) == {
        "name": spec.name,
        "family": spec.family,
        "arch": spec.arch,
        "weights": "random",
        "random": True,
        "seed": spec.seed,
        "file": None,
        "sha256": None,
        "sha256_scope": None,
    }


@pytest.mark.parametrize("name", TINY)
def test_random_builds_are_seeded(name):
    a = _state(load_backbone(f"{name}@random:1").model)
    b = _state(load_backbone(f"{name}@random:1").model)
    c = _state(load_backbone(f"{name}@random:2").model)
    assert _same_state(a, b)
    assert not _same_state(a, c)


def test_tiny_clip_runs_shared_ops_and_text_tower():
    bb = load_backbone("clip:tiny")
    visual = bb.model.visual
    assert isinstance(visual, VisionTransformer)
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    images = torch.randn(2, 3, 224, 320)
    tokens, grid = clip_ops.embed_tokens(visual, images)
    assert grid == (14, 20) and tokens.shape == (2, 1 + 14 * 20, 64)
    out, kept = clip_ops.run_blocks(visual, tokens, 1, bb.num_blocks, keep=(bb.num_blocks - 1,))
    assert out.shape == tokens.shape and set(kept) == {bb.num_blocks - 1}
    assert clip_ops.project(visual, out).shape == (2, 1 + 14 * 20, 32)
    text = bb.tokenizer(["a photo of a dog.", "sky"])
    assert text.shape == (2, 77) and text.dtype == torch.int64
    assert bb.model.encode_text(text).shape == (2, 32)


def test_clip_quick_gelu_follows_the_tag():
    from ovseg_core.backbones.builders import clip_uses_quick_gelu

    assert clip_uses_quick_gelu(parse_backbone("clip:ViT-B-16@openai"))
    assert clip_uses_quick_gelu(parse_backbone("clip:ViT-B-16-quickgelu@random"))
    assert clip_uses_quick_gelu(parse_backbone("clip:ViT-L-14@openai"))
    assert not clip_uses_quick_gelu(parse_backbone("clip:ViT-B-16@random"))
    assert not clip_uses_quick_gelu(parse_backbone("clip:ViT-H-14@laion2b_s32b_b79k"))


def test_tiny_dino_takes_any_crop_size():
    bb = load_backbone("dino:tiny8")
    with torch.no_grad():
        feats = bb.model.forward_features(torch.randn(2, 3, 40, 56))
    assert feats.shape == (2, 1 + 5 * 7, 64)


def test_tiny_sam_runs_the_automatic_mask_generator():
    bb = load_backbone("sam:tiny")
    assert bb.model.image_encoder.img_size == 1024
    image = np.random.default_rng(0).integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    # Few points and no thresholds keep segment_anything's RLE bookkeeping of noisy random masks cheap.
    generator = SamAutomaticMaskGenerator(bb.model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    records = generator.generate(image)
    assert len(records) >= 1
    assert records[0]["segmentation"].shape == (375, 500)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("sam2:hiera_t@random:3", "configs/sam2/sam2_hiera_t.yaml"),
        ("sam2:hiera_t@/w/sam2.1_hiera_tiny.pt", "configs/sam2.1/sam2.1_hiera_t.yaml"),
        ("sam2:hiera_t@/w/my_sam2_tiny.pt", "configs/sam2/sam2_hiera_t.yaml"),
    ],
)
def test_sam2_build_equals_the_packages_builder(name, config):
    """Same seed, same weights as sam2.build_sam.build_sam2 (the reference's apply_postprocessing=False)."""
    spec = parse_backbone(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        expected = _state(build_sam2(config, None, device="cpu", apply_postprocessing=False))
    assert _same_state(_state(build_model(spec)), expected)


def test_sam2_release_follows_the_tag():
    assert parse_backbone("sam2:hiera_l").sam2_release == "2"
    assert parse_backbone("sam2:hiera_l@sam2.1").sam2_release == "2.1"
    assert parse_backbone("sam2:hiera_l@random").sam2_release == "2"
    with pytest.raises(ValueError, match=r"weights for sam2:hiera_l must be one of \['official', 'sam2.1', 'random'\]"):
        parse_backbone("sam2:hiera_l@sam3")
    with pytest.raises(ValueError, match="weights for sam:vit_b must be one of"):
        parse_backbone("sam:vit_b@sam2.1")


# --- device and dtype -----------------------------------------------------------------------


def test_bfloat16_on_cpu():
    bb = load_backbone("dino:tiny16", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bb.model.parameters())
    assert bb.identity == load_backbone("dino:tiny16").identity


def test_float16_on_cpu_is_rejected():
    with pytest.raises(ValueError, match="float16 is not supported on CPU; use torch.bfloat16 or torch.float32"):
        load_backbone("clip:tiny", dtype=torch.float16)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_backbone("clip:tiny", dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be a torch device"):
        load_backbone("clip:tiny", device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_rejected():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_backbone("clip:tiny", device="cuda")
