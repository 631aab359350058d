"""Value reconstruction: softmax(tau * S) restricted to E, or uniform attention over E."""

from __future__ import annotations

import math

import pytest
import torch

from ovseg_core.corrclip.config import CorrCLIPConfig
from ovseg_core.corrclip.value_reconstruction import value_reconstruction


def test_tau_is_a_multiplier() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    e = torch.ones(1, 2, 2, dtype=torch.bool)
    a = value_reconstruction(s, e, CorrCLIPConfig())
    expected = math.exp(4.0) / (math.exp(4.0) + 1.0)  # softmax([4, 0]); a divisor would give ~0.56
    assert a.dtype == torch.float32
    assert a[0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
    a1 = value_reconstruction(s, e, CorrCLIPConfig(tau=1.0))
    assert a1[0, 0, 0].item() == pytest.approx(math.exp(1.0) / (math.exp(1.0) + 1.0), rel=1e-6)


def test_entries_outside_e_get_zero_weight() -> None:
    torch.manual_seed(0)
    s = torch.rand(2, 5, 5)
    e = torch.rand(2, 5, 5) > 0.5
    e |= torch.eye(5, dtype=torch.bool)
    a = value_reconstruction(s, e, CorrCLIPConfig())
    assert torch.all(a[~e] == 0)
    assert torch.allclose(a.sum(-1), torch.ones(2, 5))
    row = (4.0 * s[0, 0]).masked_fill(~e[0, 0], float("-inf")).softmax(-1)
    assert torch.allclose(a[0, 0], row)


def test_uniform_attention_over_e_without_value_reconstruction() -> None:
    s = torch.rand(1, 3, 3)
    e = torch.tensor([[[1, 1, 0], [1, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    a = value_reconstruction(s, e, CorrCLIPConfig(value_reconstruction=False))
    expected = torch.tensor([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]]])
    assert torch.allclose(a, expected)


def test_bad_inputs() -> None:
    s = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="empty row"):
        value_reconstruction(s, torch.tensor([[[True, False], [False, False]]]), CorrCLIPConfig())
    with pytest.raises(ValueError, match="bool"):
        value_reconstruction(s, torch.ones(1, 2, 2), CorrCLIPConfig())
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        value_reconstruction(s, torch.ones(1, 2, 3, dtype=torch.bool), CorrCLIPConfig())
