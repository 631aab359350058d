"""Synthetic bank keys shared by the FAISS index tests (``test_bank_index``, ``test_bank_coarse``)."""

from __future__ import annotations

import numpy as np

D = 64  # divisible by pq_m = 32


def clustered_keys(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Clustered fp16 keys of norm < 1 (means of unit vectors, like the reference's keys), ``(n, D)``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D))
    x = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x * rng.uniform(0.5, 1.0, (n, 1))).astype(np.float16)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit length, float32."""
    x = x.astype(np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
