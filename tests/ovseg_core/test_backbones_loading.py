"""Backbone weights: official checkpoint formats, lookup, identity, and the clear errors."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ovseg_core.backbones import WEIGHTS_ENV, BackboneSpec, load_backbone, parse_backbone, weights_identity
from ovseg_core.backbones.builders import build_model
from ovseg_core.backbones import weights as weights_mod
from ovseg_core.backbones.weights import file_fingerprint, resolve_weight_file


class _Holder(nn.Module):
    """Attribute tree used to write TorchScript archives with given state-dict keys."""


def save_openai_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state_dict`` as OpenAI's CLIP releases are stored: a TorchScript archive whose
    state dict holds the weights (conv/linear/projection weights in float16) plus the
    ``input_resolution`` / ``context_length`` / ``vocab_size`` entries."""
    root = _Holder()
    extras = {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    for key, value in {**state_dict, **extras}.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


def openai_clip_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in OpenAI's mixed precision (matrices float16, norms float32)."""
    return {k: (v.half() if v.ndim >= 2 else v.clone()) for k, v in model.state_dict().items()}


def dino_official_state(dim: int, depth: int, patch: int, grid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of facebookresearch/dino ``vision_transformer.py``."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
            b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim),
        })
    sd.update({"norm.weight": r(dim), "norm.bias": r(dim)})
    return sd


def random_state(model: nn.Module, seed: int = 123) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in model.state_dict().items()}


def assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


# --- official formats, tiny configurations --------------------------------------------------


def test_clip_openai_torchscript_file(tmp_path):
    reference = load_backbone("clip:tiny@random:9").model
    sd = openai_clip_state(reference)
    path = tmp_path / "ViT-tiny.pt"
    save_openai_torchscript(sd, path)
    bb = load_backbone(f"clip:tiny@{path}")
    assert_loaded(bb.model, sd)
    assert not bb.identity["random"] and bb.identity["seed"] is None
    assert bb.identity["name"] == "clip:tiny@ViT-tiny.pt" and bb.identity["weights"] == "file"
    assert bb.identity["file"] == "ViT-tiny.pt" and bb.identity["sha256"] == file_fingerprint(path)
    reference.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert torch.equal(bb.model.encode_image(x), reference.encode_image(x))


def test_clip_open_clip_training_checkpoint(tmp_path):
    """MetaCLIP / open_clip training files: ``{"state_dict": {"module.<key>": ...}, "epoch": ...}``."""
    sd = random_state(load_backbone("clip:tiny").model)
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    assert_loaded(load_backbone(f"clip:tiny@{path}").model, sd)


def test_clip_safetensors(tmp_path):
    sd = random_state(load_backbone("clip:tiny").model)
    path = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(path))
    assert_loaded(load_backbone(f"clip:tiny@{path}").model, sd)


def test_dino_official_key_format(tmp_path):
    sd = dino_official_state(dim=64, depth=2, patch=8, grid=28)
    path = tmp_path / "dino_tiny8.pth"
    torch.save(sd, path)
    bb = load_backbone(f"dino:tiny8@{path}")
    assert_loaded(bb.model, sd)
    assert set(bb.model.state_dict()) == set(sd)


def test_dino_full_training_checkpoint_uses_the_teacher(tmp_path):
    sd = dino_official_state(dim=64, depth=2, patch=16, grid=14, seed=3)
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 100}, path)
    assert_loaded(load_backbone(f"dino:tiny16@{path}").model, sd)


def test_sam_official_key_format(tmp_path):
    model = load_backbone("sam:tiny").model
    sd = random_state(model)
    for key in (
        "image_encoder.pos_embed",
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.neck.0.weight",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "mask_decoder.iou_prediction_head.layers.0.weight",
    ):
        assert key in sd
    path = tmp_path / "sam_tiny.pth"
    torch.save(sd, path)
    assert_loaded(load_backbone(f"sam:tiny@{path}").model, sd)


@pytest.mark.parametrize(("file", "extra_keys"), [("sam2_tiny.pt", 0), ("sam2.1_tiny.pt", 3)])
def test_sam2_official_key_format(tmp_path, file, extra_keys):
    """SAM 2 files store ``{"model": state_dict}``; a ``sam2.1*`` file loads into the SAM 2.1 config,
    which holds three more (video-memory) tensors."""
    sd = random_state(build_model(parse_backbone(f"sam2:tiny@/w/{file}")))
    assert len(sd) == len(load_backbone("sam2:tiny").model.state_dict()) + extra_keys
    for key in ("image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_prediction_head.layers.0.weight"):
        assert key in sd
    torch.save({"model": sd}, tmp_path / file)
    assert_loaded(load_backbone(f"sam2:tiny@{tmp_path / file}").model, sd)


@pytest.mark.slow
@pytest.mark.parametrize(("tag", "file"), [("", "sam2_hiera_tiny.pt"), ("@sam2.1", "sam2.1_hiera_tiny.pt")])
def test_real_sam2_hiera_t_official_names(tmp_path, tag, file):
    sd = random_state(build_model(BackboneSpec(family="sam2", arch="hiera_t", weights=tag[1:] or "official")))
    torch.save({"model": sd}, tmp_path / file)
    bb = load_backbone(f"sam2:hiera_t{tag}", weights_dir=tmp_path)
    assert_loaded(bb.model, sd)
    assert bb.identity["file"] == file and bb.identity["weights"] == (tag[1:] or "official")
    assert (bb.patch_size, bb.num_blocks) == (16, 12)


def test_identity_is_stable_and_location_independent(tmp_path):
    sd = random_state(load_backbone("dino:tiny16").model)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    torch.save(sd, a / "w.pth")
    (b / "w.pth").write_bytes((a / "w.pth").read_bytes())
    ida = load_backbone(f"dino:tiny16@{a / 'w.pth'}").identity
    idb = load_backbone(f"dino:tiny16@{b / 'w.pth'}").identity
    assert ida == idb == weights_identity(f"dino:tiny16@{a / 'w.pth'}")
    torch.save(random_state(load_backbone("dino:tiny16").model, seed=5), b / "w.pth")
    assert load_backbone(f"dino:tiny16@{b / 'w.pth'}").identity["sha256"] != ida["sha256"]


def test_file_fingerprint_reads_head_tail_and_size(tmp_path):
    mib = 1 << 20
    big = bytearray(5 * mib)
    (tmp_path / "a").write_bytes(big)
    big[2 * mib] = 1  # middle byte: outside the hashed scope
    (tmp_path / "b").write_bytes(big)
    big[-1] = 1  # last MiB: inside
    (tmp_path / "c").write_bytes(big)
    (tmp_path / "d").write_bytes(bytes(5 * mib + 1))
    fa, fb, fc, fd = (file_fingerprint(tmp_path / n) for n in "abcd")
    assert fa == fb and fa != fc and fa != fd
    (tmp_path / "s1").write_bytes(b"\x00" * 100 + b"\x01" + b"\x00" * 100)
    (tmp_path / "s2").write_bytes(b"\x00" * 201)
    assert file_fingerprint(tmp_path / "s1") != file_fingerprint(tmp_path / "s2")


# --- lookup of official files ---------------------------------------------------------------


def test_weights_dir_lookup_by_official_name(tmp_path, monkeypatch):
    spec = parse_backbone("dino:vits16")
    (tmp_path / "dino_deitsmall16_pretrain.pth").write_bytes(b"x")
    assert resolve_weight_file(spec, weights_dir=tmp_path) == tmp_path / "dino_deitsmall16_pretrain.pth"
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert resolve_weight_file(spec) == tmp_path / "dino_deitsmall16_pretrain.pth"


def test_hub_only_clip_tag_accepts_safetensors(tmp_path):
    spec = parse_backbone("clip:ViT-H-14@laion2b_s32b_b79k")
    sub = tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    sub.mkdir()
    (sub / "open_clip_model.safetensors").write_bytes(b"x")
    assert resolve_weight_file(spec, weights_dir=tmp_path) == sub / "open_clip_model.safetensors"


def test_explicit_weights_file_for_a_tag(tmp_path):
    path = tmp_path / "my-openai-copy.pt"
    path.write_bytes(b"x")
    assert resolve_weight_file(parse_backbone("clip:ViT-B-16@openai"), weights=path) == path


def test_missing_official_file_names_file_directory_and_url(tmp_path, monkeypatch):
    message = (rf"'sam_vit_b_01ec64.pth' not found in weights directory '{tmp_path}'.*"
               r"https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth")
    with pytest.raises(FileNotFoundError, match=message):
        load_backbone("sam:vit_b", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        weights_identity("sam:vit_b", weights_dir=tmp_path)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=rf"'ViT-B-16.pt' not found because no weights directory is set.*{WEIGHTS_ENV}"):
        load_backbone("clip:ViT-B-16@openai")


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file '.*nothing\.pth' for dino:tiny8 does not exist"):
        load_backbone(f"dino:tiny8@{tmp_path / 'nothing.pth'}")


def test_weights_argument_conflicts(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="has random weights; drop weights="):
        load_backbone("dino:tiny8", weights=path)
    with pytest.raises(ValueError, match="already names a checkpoint file; drop weights="):
        load_backbone(f"dino:tiny8@{path}", weights=path)


def test_download_is_opt_in_and_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(ValueError, match="allow_download needs a target directory"):
        load_backbone("dino:vits16", allow_download=True)
    # An address that can never resolve (RFC 2606 .invalid) stands in for a closed network.
    monkeypatch.setattr(weights_mod, "_DINO_URL", "https://ovseg-weights.invalid/{stem}/{stem}.pth")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"downloading 'dino_deitsmall16_pretrain.pth' for dino:vits16 failed.*by hand"):
        load_backbone("dino:vits16", weights_dir=tmp_path, allow_download=True)
    assert time.monotonic() - start < weights_mod.DOWNLOAD_PROBE_TIMEOUT_S + 5
    assert list(tmp_path.iterdir()) == []


# --- corrupted and wrong-architecture files -------------------------------------------------


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint" * 100)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint '{path}'.*corrupted or truncated"):
        load_backbone(f"sam:tiny@{path}")


def test_truncated_file(tmp_path):
    sd = random_state(load_backbone("dino:tiny8").model)
    path = tmp_path / "truncated.pth"
    torch.save(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"cannot read checkpoint '{path}'"):
        load_backbone(f"dino:tiny8@{path}")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(random_state(load_backbone("dino:tiny8").model), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"cannot read checkpoint '{path}'"):
        load_backbone(f"dino:tiny8@{path}")


class _Payload:
    """A pickled object that is not a tensor container."""


def test_pickled_python_objects_are_refused(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"weights": _Payload()}, path)
    with pytest.raises(ValueError, match=r"refused \(weights_only=True\)"):
        load_backbone(f"dino:tiny8@{path}")


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' does not hold a state dict"):
        load_backbone(f"dino:tiny8@{path}")


def test_wrong_architecture_shape_mismatch(tmp_path):
    path = tmp_path / "dino8.pth"
    torch.save(dino_official_state(dim=64, depth=2, patch=8, grid=28), path)
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' does not fit dino:tiny16 .*shape mismatch: "
                       r"pos_embed \(file \(1, 785, 64\), model \(1, 197, 64\)\), patch_embed.proj.weight"):
        load_backbone(f"dino:tiny16@{path}")


def test_wrong_family_lists_first_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(load_backbone("sam:tiny").model.state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit dino:tiny8 .*missing keys: cls_token, pos_embed, "
                       r"patch_embed.proj.weight, patch_embed.proj.bias, blocks.0.norm1.weight \(\+\d+ more\); "
                       r"unexpected keys: image_encoder.pos_embed"):
        load_backbone(f"dino:tiny8@{path}")


def test_extra_keys_are_rejected(tmp_path):
    sd = dino_official_state(dim=64, depth=2, patch=8, grid=28)
    sd["head.weight"] = torch.zeros(10, 64)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"unexpected keys: head.weight$"):
        load_backbone(f"dino:tiny8@{path}")


# --- real architectures (slow) --------------------------------------------------------------


@pytest.mark.slow
def test_real_clip_vit_b16_openai_torchscript(tmp_path):
    reference = load_backbone("clip:ViT-B-16@random:1").model
    sd = openai_clip_state(reference)
    save_openai_torchscript(sd, tmp_path / "ViT-B-16.pt")
    bb = load_backbone("clip:ViT-B-16@openai", weights_dir=tmp_path)
    assert_loaded(bb.model, sd)
    assert bb.identity == weights_identity("clip:ViT-B-16@openai", weights_dir=tmp_path)
    assert bb.identity["file"] == "ViT-B-16.pt" and bb.identity["name"] == "clip:ViT-B-16@openai"
    assert (bb.patch_size, bb.num_blocks) == (16, 12)
    assert type(bb.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert bb.tokenizer(["a cat"]).shape == (1, 77)


@pytest.mark.slow
def test_real_dino_vits16_official(tmp_path):
    sd = dino_official_state(dim=384, depth=12, patch=16, grid=14)
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    bb = load_backbone("dino:vits16", weights_dir=tmp_path)
    assert_loaded(bb.model, sd)
    assert set(bb.model.state_dict()) == set(sd)
    assert (bb.patch_size, bb.num_blocks) == (16, 12)


@pytest.mark.slow
def test_real_sam_vit_b_official(tmp_path):
    sd = random_state(load_backbone("sam:vit_b@random").model)
    torch.save(sd, tmp_path / "sam_vit_b_01ec64.pth")
    bb = load_backbone("sam:vit_b", weights_dir=tmp_path)
    assert_loaded(bb.model, sd)
    assert (bb.patch_size, bb.num_blocks) == (16, 12)
