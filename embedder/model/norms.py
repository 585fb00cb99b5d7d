"""Normalisation layers: Gemma's RMSNorm (scale stored as `1 + scale`) and BERT's LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Gemma RMSNorm over the last axis, computed in float32, result in the input dtype."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # Zero init: Gemma stores the scale as an offset from one.
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        # Multiply before the cast back, as Gemma does (differs from Llama in bf16).
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nn.Module):
    """BERT LayerNorm (mean and variance over the last axis) in float32."""

    eps: float = 1e-12
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (dim,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (dim,), self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
