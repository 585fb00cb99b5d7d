"""Matryoshka truncation: the first `dim` coordinates of an embedding, L2-renormalised, in NumPy.

The one host-side L2 normalisation (`Embedder.encode`, the evaluators); the loss has its own
in JAX (`losses.l2_normalize`), traced inside the jitted step."""
from __future__ import annotations

import numpy as np


def truncate_normalize(embeddings: np.ndarray, dim: int | None) -> np.ndarray:
    """`[N, D]` -> `[N, dim]` float32 rows of unit norm (`dim=None` keeps all D)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"truncate_normalize: expected [N, D] embeddings, got shape {embeddings.shape}")
    full = embeddings.shape[1]
    if dim is None:
        dim = full
    if not 1 <= dim <= full:
        raise ValueError(f"MRL dim {dim} is not in 1..{full} (the encoder's output size); pick --dims at most {full}")
    prefix = embeddings[:, :dim]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    # A zero row stays zero rather than becoming NaN.
    return prefix / np.maximum(norms, 1e-12)
