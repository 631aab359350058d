"""Tests for ovseg_core.features.sam_decoder: the shared-image mask decoder equals the library's."""

from __future__ import annotations

import pytest
import torch

from ovseg_core.backbones import load_backbone
from ovseg_core.features.sam_decoder import decode_point_prompts


@pytest.fixture(scope="module")
def tiny_sam() -> torch.nn.Module:
    return load_backbone("sam:tiny@random:3").model


def _prompts(model: torch.nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, 1, 2, generator=g) * 1024
    labels = torch.ones(n, 1, dtype=torch.int)
    return model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "multimask"), [(1, False), (7, False), (64, True), (5, True)])
@torch.no_grad()
def test_equals_the_library_decoder_bit_for_bit(tiny_sam, n, multimask) -> None:
    g = torch.Generator().manual_seed(n)
    image_embeddings = torch.randn(1, 32, 64, 64, generator=g)
    sparse, dense = _prompts(tiny_sam, n, seed=n)
    image_pe = tiny_sam.prompt_encoder.get_dense_pe()
    expected_masks, expected_iou = tiny_sam.mask_decoder(
        image_embeddings=image_embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask,
    )
    masks, iou = decode_point_prompts(tiny_sam.mask_decoder, image_embeddings, image_pe, sparse, dense[:1], multimask)
    assert masks.shape == expected_masks.shape == (n, 3 if multimask else 1, 256, 256)
    assert torch.equal(masks, expected_masks) and torch.equal(iou, expected_iou)


@torch.no_grad()
def test_rejects_a_batch_of_images(tiny_sam) -> None:
    sparse, dense = _prompts(tiny_sam, 2, seed=0)
    with pytest.raises(ValueError, match="needs one image, one shared dense embedding"):
        decode_point_prompts(
            tiny_sam.mask_decoder, torch.zeros(2, 32, 64, 64), tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense[:1], False
        )
