"""Rotary position embeddings (half-split layout, as Gemma and HF apply them)."""

from __future__ import annotations

import jax.numpy as jnp


def rope_inv_freq(head_dim: int, *, base: float, scale_factor: float = 1.0):
    """`[head_dim / 2]` float32 inverse frequencies; `scale_factor` is linear RoPE scaling
    (positions divided by it), which Gemma 3 4B and larger use on global layers."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return inv_freq / scale_factor


def rotate(x, positions, inv_freq):
    """Rotates `x` `[B, L, N, H]` by `positions` (`[B, L]` or `[L]`) at `inv_freq` `[H / 2]`."""
    head_dim = x.shape[-1]
    positions = jnp.asarray(positions, jnp.float32)
    if positions.ndim == 1:
        positions = positions[None, :]
    angles = positions[..., None] * inv_freq  # [B, L, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos = jnp.cos(angles).astype(x.dtype)
    sin = jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def apply_rope(x, positions, *, base: float, scale_factor: float = 1.0):
    """Rotates `x` `[B, L, N, H]` by `positions` `[B, L]` or `[L]` with RoPE at `base`."""
    return rotate(x, positions, rope_inv_freq(x.shape[-1], base=base, scale_factor=scale_factor))
