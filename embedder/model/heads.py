"""Embedding heads: masked mean pooling and bias-free projections (identity when none)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.model.einsum import Einsum


def mean_pool(hidden, mask):
    """Mean of `hidden` `[B, L, D]` over positions where `mask` `[B, L]` is 1, in float32."""
    m = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    # A row with no real token pools to zeros instead of NaN.
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def packed_mean_pool(hidden, sequence_ids, num_sequences: int):
    """`[num_sequences, D]` float32: the mean of `hidden` `[R, L, D]` over the tokens of each
    packed sequence (`sequence_ids` `[R, L]`, -1 on padding). A sequence with no token pools
    to zeros, as an all-padding row does in `mean_pool`."""
    d = hidden.shape[-1]
    ids = sequence_ids.reshape(-1)
    ids = jnp.where(ids < 0, num_sequences, ids)  # padding goes to one extra, dropped, segment
    total = jax.ops.segment_sum(hidden.reshape(-1, d).astype(jnp.float32), ids, num_sequences + 1)
    count = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids, num_sequences + 1)
    return total[:num_sequences] / jnp.maximum(count[:num_sequences], 1.0)[:, None]


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


# The train params' entry of the learned student -> teacher map of embedding distillation: trained
# beside the model, not part of it (exports, soups and the model store leave it out).
TEACHER_PROJECTION = "teacher_projection"


class TeacherProjection(nn.Module):
    """Bias-free `[D] -> [teacher_dim]` map of unit student embeddings onto a teacher's width
    (`distill.losses.embedding_distillation`'s `projection`: `params["w"]`)."""

    teacher_dim: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Einsum((x.shape[-1], self.teacher_dim), ("proj_in", "proj"), jnp.float32, self.param_dtype,
                      name="projection")("BD,DE->BE", x)


def model_params(params):
    """The model's own parameters of a train params tree (without `TEACHER_PROJECTION`)."""
    if isinstance(params, dict) and TEACHER_PROJECTION in params:
        return {k: v for k, v in params.items() if k != TEACHER_PROJECTION}
    return params
