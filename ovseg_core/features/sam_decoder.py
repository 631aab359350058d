"""segment-anything v1's mask decoder for many point prompts on one image, without repeated work.

``MaskDecoder.predict_masks`` copies the image embedding, the dense prompt embedding and the
positional encoding once per prompt (``repeat_interleave``) and runs the whole two-way
transformer on the copies. In automatic mask generation every prompt of a batch sees the same
image and the same dense embedding (no mask prompts), so the first two-way block's image side is
identical for all prompts until its image-to-token attention writes into it:

- token-to-image attention: the key and value projections of the image tokens;
- image-to-token attention: the query projection of the image tokens.

:func:`decode_point_prompts` computes those three projections (and the sums feeding them) once
and broadcasts them over the prompts; every later step runs the decoder's own modules on the
per-prompt tensors. Each output element goes through the same operations on the same values as in
the library (broadcast operands instead of materialised copies), so the masks equal
``MaskDecoder.forward``'s; ``tests/ovseg_core/test_features_sam_decoder.py`` checks it bit for bit.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention

__all__ = ["decode_point_prompts"]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, N, C) -> (B, heads, N, C / heads)``, as ``Attention._separate_heads``."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` on already projected, head-separated q, k, v (batch dims broadcast)."""
    scores = q @ k.permute(0, 1, 3, 2)
    scores = scores / math.sqrt(q.shape[-1])
    scores = torch.softmax(scores, dim=-1)
    out = scores @ v
    b, n_heads, n_tokens, c_per_head = out.shape
    out = out.transpose(1, 2).reshape(b, n_tokens, n_heads * c_per_head)
    return attn.out_proj(out)


def decode_point_prompts(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embedding: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.forward`` for B prompts on one image whose dense prompt embedding is shared.

    Args:
        decoder: the model's ``mask_decoder``.
        image_embeddings: ``(1, C, h, w)`` image embedding.
        image_pe: ``(1, C, h, w)`` dense positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse_prompt_embeddings: ``(B, T, C)`` point embeddings of the B prompts.
        dense_prompt_embedding: ``(1, C, h, w)`` dense embedding shared by all prompts (the
            prompt encoder's no-mask embedding).
        multimask_output: as ``MaskDecoder.forward``.
    Returns:
        low-resolution mask logits ``(B, M, 4h, 4w)`` and predicted IoUs ``(B, M)``, M = 3 or 1.
    """
    transformer = decoder.transformer
    first = transformer.layers[0]
    if image_embeddings.shape[0] != 1 or dense_prompt_embedding.shape[0] != 1 or not first.skip_first_layer_pe:
        raise ValueError("decode_point_prompts needs one image, one shared dense embedding and SAM's first block")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    b = tokens.shape[0]
    _, c, h, w = image_embeddings.shape
    src = image_embeddings + dense_prompt_embedding  # (1, C, h, w): the same for every prompt
    keys0 = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)

    # First two-way block: self-attention of the tokens (no positional encoding on this block).
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    # Tokens attend to the image: the image's keys and values are projected once.
    t2i, heads = first.cross_attn_token_to_image, first.cross_attn_token_to_image.num_heads
    k_image = keys0 + key_pe
    attn_out = _attend(
        t2i, _heads(t2i.q_proj(queries + tokens), heads), _heads(t2i.k_proj(k_image), heads), _heads(t2i.v_proj(keys0), heads)
    )
    queries = first.norm2(queries + attn_out)
    queries = first.norm3(queries + first.mlp(queries))
    # The image attends to the tokens: the image's queries are projected once.
    i2t, heads = first.cross_attn_image_to_token, first.cross_attn_image_to_token.num_heads
    q_tokens = queries + tokens
    attn_out = _attend(
        i2t, _heads(i2t.q_proj(k_image), heads), _heads(i2t.k_proj(q_tokens), heads), _heads(i2t.v_proj(queries), heads)
    )
    keys = first.norm4(keys0 + attn_out)  # (B, hw, C): per prompt from here on

    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    hs = transformer.norm_final_attn(queries + attn_out)

    # MaskDecoder.predict_masks from here on: upscale, hypernetworks, IoU head, then the slice.
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)], dim=1
    )
    _, c_up, h_up, w_up = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c_up, h_up * w_up)).view(b, -1, h_up, w_up)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]
