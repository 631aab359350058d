"""Scope reconstruction: S from q+k and the interaction matrix E on hand-made region maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.mask_clustering import cluster_masks
from ovseg_core.corrclip.scope_reconstruction import scope_reconstruction, similarity

# Hand-made S of 4 patches; mean(S) = (4 + 2 * 2.3) / 16 = 0.5375.
S4 = torch.tensor(
    [
        [1.0, 0.9, 0.1, 0.2],
        [0.9, 1.0, 0.3, 0.0],
        [0.1, 0.3, 1.0, 0.8],
        [0.2, 0.0, 0.8, 1.0],
    ]
)[None]


def test_similarity_is_gram_of_normalised_features() -> None:
    torch.manual_seed(0)
    qk = F.normalize(torch.randn(2, 3, 4, 8), dim=-1)
    s = similarity(qk)
    assert s.shape == (2, 12, 12) and s.dtype == torch.float32
    f = qk.reshape(2, 12, 8)
    assert torch.allclose(s, f @ f.transpose(1, 2))
    assert torch.allclose(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, 12), atol=1e-6)


def test_similarity_rejects_unnormalised_features() -> None:
    with pytest.raises(ValueError, match="L2-normalised"):
        similarity(torch.ones(1, 2, 2, 4))


def test_e_known_answer_with_unsegmented_patch() -> None:
    merged = torch.tensor([[0, 1, 1, 2]])
    e = scope_reconstruction(S4, merged, CorrCLIPConfig())
    expected = torch.tensor(
        [
            [1, 1, 0, 0],  # m0 row: S > 0.5375 -> patches 0 and 1
            [1, 1, 1, 0],  # region 1 + the m0 column where S > mean
            [0, 1, 1, 0],
            [0, 0, 0, 1],  # region 2 alone
        ],
        dtype=torch.bool,
    )[None]
    assert torch.equal(e, expected)


def test_e_uses_the_or_form_for_m0_not_the_outer_product() -> None:
    # Patches 0 and 3 unsegmented, 1 and 2 one region. outer(m0, m0) would forbid every
    # m0-to-region pair; the reference's OR form allows them where S > mean(S).
    merged = torch.tensor([[0, 2, 2, 0]])
    e = scope_reconstruction(S4, merged, CorrCLIPConfig())[0]
    # (0, 1): patch 0 is m0, patch 1 is a region patch, S = 0.9 > mean -> allowed by the OR form
    assert e[0, 1] and e[1, 0]
    # (2, 3): patch 3 m0, patch 2 region, S = 0.8 > mean -> allowed
    assert e[2, 3] and e[3, 2]
    # (0, 3): both m0 but S = 0.2 < mean -> not allowed (the similarity gate also holds inside m0)
    assert not e[0, 3] and not e[3, 0]
    assert e[1, 2] and e[2, 1]  # same region regardless of S = 0.3


def test_e_quirk_no_unsegmented_patch_makes_the_smallest_region_m0() -> None:
    regions = torch.tensor([[[4, 4, 6, 6]]])
    qk = F.normalize(torch.tensor([1.0, 0.0, 0.0]).expand(1, 1, 4, 3), dim=-1)
    merged_quirk = cluster_masks(qk, regions, CorrCLIPConfig(mask_clustering=False)).reshape(1, 4)
    merged_fixed = cluster_masks(qk, regions, CorrCLIPConfig(mask_clustering=False, m0_quirk=False)).reshape(1, 4)
    assert merged_quirk.tolist() == [[0, 0, 1, 1]] and merged_fixed.tolist() == [[1, 1, 2, 2]]
    quirk = scope_reconstruction(S4, merged_quirk, CorrCLIPConfig())[0]
    fixed = scope_reconstruction(S4, merged_fixed, CorrCLIPConfig())[0]
    # fixed: two regions, block diagonal
    assert torch.equal(fixed, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))
    # quirk: region 4 is "unsegmented": its rows/columns follow S > mean instead of region membership
    assert torch.equal(quirk, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))
    # with a low-similarity pair inside the m0 region the two differ
    s = S4.clone()
    s[0, 0, 1] = s[0, 1, 0] = 0.05
    quirk_low = scope_reconstruction(s, torch.tensor([[0, 0, 1, 1]]), CorrCLIPConfig())[0]
    fixed_low = scope_reconstruction(s, torch.tensor([[1, 1, 2, 2]]), CorrCLIPConfig())[0]
    assert not quirk_low[0, 1] and fixed_low[0, 1]


def test_e_mean_is_per_window() -> None:
    s = torch.cat([S4, S4 - 0.5])  # shifting S shifts its mean: same E
    merged = torch.tensor([[0, 1, 1, 2], [0, 1, 1, 2]])
    e = scope_reconstruction(s, merged, CorrCLIPConfig())
    assert torch.equal(e[0], e[1])


def test_padding_patches_only_see_themselves() -> None:
    merged = torch.tensor([[0, 1, -1, 1]])
    e = scope_reconstruction(S4, merged, CorrCLIPConfig())[0]
    assert e[2].tolist() == [False, False, True, False]
    assert e[:, 2].tolist() == [False, False, True, False]
    full = scope_reconstruction(S4, merged, CorrCLIPConfig(scope_reconstruction=False))[0]
    assert full[2].tolist() == [False, False, True, False]
    assert full[[0, 1, 3]][:, [0, 1, 3]].all()


def test_e_is_built_without_region_loops_for_many_regions() -> None:
    torch.manual_seed(0)
    merged = torch.randint(0, 300, (2, 900))
    s = torch.rand(2, 900, 900)
    e = scope_reconstruction(s, merged, CorrCLIPConfig())
    one_hot = F.one_hot(merged, 300)[..., 1:].float()
    regions = (one_hot @ one_hot.transpose(1, 2)) > 0
    m0 = merged == 0
    expected = regions | ((m0[:, :, None] | m0[:, None, :]) & (s > s.mean(dim=(1, 2), keepdim=True)))
    assert torch.equal(e, expected)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        scope_reconstruction(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), CorrCLIPConfig())
    with pytest.raises(ValueError, match="merged ids"):
        scope_reconstruction(S4, torch.zeros(1, 3, dtype=torch.long), CorrCLIPConfig())
