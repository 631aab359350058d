"""DFN2B-CLIP ViT-B/16 (``clip:ViT-B-16@dfn2b``), CorrCLIPv2's DMCE auxiliary CLIP: registered with its official
file, built as the authors' hub config says (QuickGELU, 512-d embeddings), loaded from a weights folder, and a
missing file named with the way to give it. No download: the checkpoint is written here from a random build."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU

from ovseg_core.backbones import WEIGHTS_ENV, list_backbones, load_backbone, official_weight_file, parse_backbone
from ovseg_core.backbones.builders import build_model

DFN = "clip:ViT-B-16@dfn2b"
FILE = "DFN2B-CLIP-ViT-B-16/open_clip_pytorch_model.bin"  # the hub repository's file, in its repository's folder


def test_dfn2b_is_registered_with_its_official_hub_file():
    assert DFN in list_backbones()
    assert official_weight_file(DFN) == (FILE, "https://huggingface.co/apple/DFN2B-CLIP-ViT-B-16/resolve/main/"
                                               "open_clip_pytorch_model.bin")
    assert parse_backbone("clip:ViT-B-16@DFN2B").name == DFN


def test_a_missing_dfn2b_file_names_the_file_the_folder_and_the_setting(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf"'{FILE}' not found in weights directory '{tmp_path}'.*"
                                                r"https://huggingface.co/apple/DFN2B-CLIP-ViT-B-16/"):
        load_backbone(DFN, weights_dir=tmp_path)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=rf"'{FILE}' not found because no weights directory is set.*"
                                                rf"pass weights_dir= or set {WEIGHTS_ENV}"):
        load_backbone(DFN)


@pytest.mark.slow  # a real-size ViT-B/16 CLIP, built twice
def test_dfn2b_builds_with_quick_gelu_and_512_d_embeddings_and_loads_from_the_weights_folder(tmp_path):
    model = build_model(parse_backbone(DFN))  # the architecture at random init, no file read
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # DFN2B was trained with it
    assert model.visual.output_dim == 512 and tuple(model.text_projection.shape) == (512, 512)
    with torch.no_grad():
        image = model.encode_image(torch.zeros(1, 3, 224, 224))
        text = model.encode_text(torch.zeros(1, 77, dtype=torch.long))
    assert tuple(image.shape) == (1, 512) and tuple(text.shape) == (1, 512)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / FILE).parent.mkdir()
    torch.save(state, tmp_path / FILE)  # a state dict, as the hub's open_clip_pytorch_model.bin holds
    bb = load_backbone(DFN, weights_dir=tmp_path)
    assert bb.identity["file"] == "open_clip_pytorch_model.bin" and bb.identity["name"] == DFN
    assert not bb.identity.get("random")
    assert (bb.patch_size, bb.num_blocks) == (16, 12)
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert bb.tokenizer(["a cat"]).shape == (1, 77)
