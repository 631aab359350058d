"""From dense features to labels: cosine logits, synonym max-pooling, prob_thd, area_thd.

Follows the reference post-processing (methods.md section 1; SC-CLIP ``postprocess_result``):
``softmax(logit_scale * cos)`` over all text queries; a class scores the max of its synonyms'
probabilities; SC-CLIP's ``area_thd`` (VOC21) zeroes foreground classes whose argmax area is
not above ``area_thd`` x the total foreground area; then argmax, and pixels whose winning
probability is below ``prob_thd`` become class 0 (background).

Window merging itself lives in :func:`ovseg_core.windows.merge_window_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["class_probabilities", "dense_logits", "predict", "window_logits"]

_NORM_TOL = 1e-3


def dense_logits(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every feature vector with every text query.

    Args:
        features: ``(B, gh, gw, E)`` float dense features, not normalised (normalised here).
        text: ``(Q, E)`` float text embeddings, L2-normalised.

    Returns:
        ``(B, Q, gh, gw)`` cosine logits, dtype of ``features``.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (B, gh, gw, E), got shape {tuple(features.shape)}")
    if text.ndim != 2 or text.shape[1] != features.shape[-1]:
        raise ValueError(f"text must be (Q, E={features.shape[-1]}), got shape {tuple(text.shape)}")
    norms = text.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=_NORM_TOL):
        raise ValueError("text embeddings must be L2-normalised (row norms are not 1); normalise them first")
    feats = F.normalize(features, dim=-1)
    return torch.einsum("bhwe,qe->bqhw", feats, text.to(feats.dtype))


def window_logits(features: torch.Tensor, text: torch.Tensor, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Cosine logits bilinearly upsampled (``align_corners=False``) to the padded crop size.

    Args:
        features: ``(B, gh, gw, E)`` float dense features of ``B`` windows.
        text: ``(Q, E)`` L2-normalised text embeddings.
        padded_hw: ``(Hp, Wp)`` of the windows (``WindowPlan.padded_hw``).

    Returns:
        ``(B, Q, Hp, Wp)`` float.
    """
    hp, wp = (int(v) for v in padded_hw)
    if hp <= 0 or wp <= 0:
        raise ValueError(f"padded_hw must be positive, got {padded_hw!r}")
    logits = dense_logits(features, text)
    return F.interpolate(logits, size=(hp, wp), mode="bilinear", align_corners=False)


def _check_query_to_class(query_to_class: torch.Tensor, num_queries: int) -> int:
    """Validate the query -> class index and return the number of classes."""
    if query_to_class.ndim != 1 or query_to_class.shape[0] != num_queries:
        raise ValueError(f"query_to_class must be ({num_queries},), got shape {tuple(query_to_class.shape)}")
    if query_to_class.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"query_to_class must be int64, got {query_to_class.dtype}")
    if num_queries == 0 or int(query_to_class.min()) < 0:
        raise ValueError("query_to_class must be non-empty with class indices >= 0")
    num_classes = int(query_to_class.max()) + 1
    present = torch.bincount(query_to_class.long(), minlength=num_classes) > 0
    if not bool(present.all()):
        missing = torch.nonzero(~present).flatten().tolist()
        raise ValueError(f"query_to_class has no query for classes {missing}; every class needs one")
    return num_classes


def class_probabilities(logits: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``softmax(logit_scale * logits)`` over queries, max-pooled over each class's synonyms.

    Args:
        logits: ``(Q, H, W)`` float cosine logits.
        query_to_class: ``(Q,)`` int64 class index of each query; classes ``0..C-1`` all present.
        logit_scale: softmax multiplier (> 0).

    Returns:
        ``(C, H, W)`` float class probabilities (not re-normalised: synonyms share mass).
    """
    if logits.ndim != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (Q, H, W) tensor, got {logits.dtype} {tuple(logits.shape)}")
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    num_classes = _check_query_to_class(query_to_class, logits.shape[0])
    probs = torch.softmax(logits * logit_scale, dim=0)
    if num_classes == logits.shape[0] and bool((query_to_class == torch.arange(num_classes)).all()):
        return probs
    index = query_to_class.long().to(probs.device).view(-1, 1, 1).expand_as(probs)
    out = probs.new_zeros((num_classes, *probs.shape[1:]))
    return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=True)


def predict(
    logits: torch.Tensor,
    query_to_class: torch.Tensor,
    logit_scale: float,
    prob_thd: float | None,
    area_thd: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from merged cosine logits at original size.

    Steps (reference order): class probabilities (:func:`class_probabilities`); if
    ``area_thd``: per foreground class (1..C-1) its argmax area; classes whose area is not
    ``> area_thd * total foreground area`` get probability 0; argmax (ties -> smaller class);
    if ``prob_thd``: pixels whose winning probability ``< prob_thd`` -> 0.

    Args:
        logits: ``(Q, H, W)`` float merged cosine logits.
        query_to_class: ``(Q,)`` int64.
        logit_scale: softmax multiplier (> 0).
        prob_thd: background threshold in ``[0, 1]`` or None (datasets without background).
        area_thd: SC-CLIP's foreground area share in ``[0, 1]`` or None.

    Returns:
        ``(labels (H, W) int64, winning probability (H, W) float32)``; the probability is the
        max class probability after ``area_thd`` and before ``prob_thd``.
    """
    if prob_thd is not None and not 0.0 <= prob_thd <= 1.0:
        raise ValueError(f"prob_thd must be None or in [0, 1], got {prob_thd}")
    if area_thd is not None and not 0.0 <= area_thd <= 1.0:
        raise ValueError(f"area_thd must be None or in [0, 1], got {area_thd}")
    probs = class_probabilities(logits, query_to_class, logit_scale)
    num_classes = probs.shape[0]
    if area_thd is not None:
        if num_classes < 2:
            raise ValueError("area_thd needs a background class 0 and at least one foreground class")
        first = probs.argmax(dim=0)
        area = torch.bincount(first.flatten(), minlength=num_classes)[1:]
        keep = area > area_thd * area.sum()
        probs[1:] *= keep.to(probs.dtype).view(-1, 1, 1)
    win_prob, labels = probs.max(dim=0)
    if prob_thd is not None:
        labels = torch.where(win_prob < prob_thd, torch.zeros_like(labels), labels)
    return labels.long(), win_prob.float()
