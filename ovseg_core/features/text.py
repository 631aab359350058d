"""Text side: prompt-ensembled text embeddings of a vocabulary (``ovseg_core.vocabulary``).

Both reference codes (methods.md §1): every synonym of every class is its own query; a query's
embedding is the 80 OpenAI ImageNet templates filled with the name, each encoded and
L2-normalised, averaged, and L2-normalised again. A class's score is later the max over its
queries (``Vocabulary.query_to_class``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ovseg_core.vocabulary import Vocabulary, parse_class_lines, parse_vocabulary_string  # torch-free half

__all__ = [
    "IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "Vocabulary",
    "encode_text_truncated",
    "parse_class_lines",
    "parse_vocabulary_string",
    "text_embeddings",
]

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
"""The 80 OpenAI ImageNet prompt templates, in the CLIP / reference-code order; ``{}`` is the name."""


# Named prompt-template sets. "imagenet80" is what both papers use; "single" (one template) is
# a cheap option for CPU-only smoke runs and the random-weight demo, never for paper numbers.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": tuple(IMAGENET_TEMPLATES),
    "single": ("a photo of a {}.",),
}

@torch.no_grad()
def text_embeddings(
    clip_model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    vocab: Vocabulary,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Prompt-ensembled, L2-normalised text embedding of every query of ``vocab``.

    Per query: fill each template, encode, L2-normalise each, average over templates,
    L2-normalise again. Prompts of all queries are encoded together in batches of
    ``batch_size``.

    Args:
        clip_model: an open_clip ``CLIP`` (anything with ``encode_text(tokens) -> (N, E)``).
        tokenizer: open_clip tokenizer: list of ``N`` strings -> ``(N, context_length)`` token ids.
        vocab: the classes and synonyms; queries are ``vocab.queries``.
        templates: prompt templates, each with exactly one ``{}``.
        batch_size: prompts per ``encode_text`` call (> 0).
    Returns:
        ``(Q, E) float32`` unit-norm rows on the model's device, row ``q`` for ``vocab.queries[q]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates must be a non-empty sequence of strings with one '{}' each")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
    device = next(clip_model.parameters()).device
    queries = vocab.queries
    prompts = [template.format(name) for name in queries for template in templates]
    tokens = tokenizer(prompts)
    # Batch prompts of similar length together so that truncation (encode_text_truncated) pays off.
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)
    parts = []
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        parts.append(F.normalize(encode_text_truncated(clip_model, tokens[idx].to(device)).float(), dim=-1))
    encoded = torch.cat(parts)
    per_prompt = torch.empty_like(encoded)
    per_prompt[order.to(encoded.device)] = encoded
    per_prompt = per_prompt.reshape(len(queries), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def encode_text_truncated(clip_model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip_model.encode_text(tokens)`` computed on the prompt prefix that matters.

    CLIP's text tower is causal and pools at the end-of-text token (the largest id), so the
    positions after the last EOT of the batch cannot change the result: the tower is run on
    ``tokens[:, :L]`` with the first ``L`` positional embeddings and the ``L x L`` corner of
    its causal mask (prompts are ~15 of 77 tokens, about 5x less work). Towers of another
    kind (no causal ``attn_mask`` or another pooling) fall back to ``encode_text``.

    Args:
        tokens: ``(N, context_length) int64`` token ids.
    Returns:
        ``(N, E)`` unnormalised text features.
    """
    parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if getattr(clip_model, "text_pool_type", None) != "argmax" or not all(hasattr(clip_model, p) for p in parts) \
            or clip_model.attn_mask is None:
        return clip_model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    cast = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens[:, :length]).to(cast)
    x = x + clip_model.positional_embedding[:length].to(cast)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])
    x = clip_model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :length].argmax(dim=-1)]
    proj = clip_model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj
