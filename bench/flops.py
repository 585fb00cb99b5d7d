"""Model FLOPs of an encoder: the formulas the utilisation numbers use.

Per sequence of length S through a model with P non-embedding matmul parameters,
L layers and attention width A = num_heads * head_dim:

    forward (encode):  2 * P * S  +  4 * L * S^2 * A     (QK^T and PV, 2 * S^2 * A each)
    train step:        6 * P * S  + 12 * L * S^2 * A     (backward = 2x forward)

Embedding lookups, norms, biases, softmax and the loss are left out (small).
"""

from __future__ import annotations

from typing import Iterable


def non_embedding_params(cfg) -> int:
    """Matmul weights of the encoder layers and projection head (no embeddings, norms, biases)."""
    d, f = cfg.hidden_size, cfg.mlp_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if cfg.family == "gemma" else 2) * d * f  # GeGLU has gate, up and down
    head, width = 0, d
    for out in cfg.projection_dims:
        head += width * out
        width = out
    return cfg.num_layers * (attn + mlp) + head


def sequence_flops(cfg, length: int, train: bool) -> float:
    """FLOPs of one sequence of `length` tokens (forward, or forward + backward)."""
    width = cfg.num_heads * cfg.head_dim
    fwd = 2 * non_embedding_params(cfg) * length + 4 * cfg.num_layers * length ** 2 * width
    return 3 * fwd if train else fwd


def total_flops(cfg, lengths: Iterable[int], train: bool) -> float:
    return float(sum(sequence_flops(cfg, int(s), train) for s in lengths))
