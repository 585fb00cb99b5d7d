"""Embedding heads: masked mean pooling and bias-free projections (identity when none)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from embedder.model.einsum import Einsum


def mean_pool(hidden, mask):
    """Mean of `hidden` `[B, L, D]` over positions where `mask` `[B, L]` is 1, in float32."""
    m = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    # A row with no real token pools to zeros instead of NaN.
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class ProjectionHead(nn.Module):
    """Chain of bias-free linear maps `in -> dims[0] -> dims[1] ...`, in float32.

    EmbeddingGemma uses (3072, 768), Gemini one layer to 3072; () is the identity.
    """

    dims: tuple[int, ...] = ()
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, out_dim in enumerate(self.dims):
            in_axis = "embed" if i == 0 else "proj_in"
            x = Einsum((x.shape[-1], out_dim), (in_axis, "proj"), jnp.float32, self.param_dtype,
                       name=f"projection_{i}")("BD,DE->BE", x)
        return x
