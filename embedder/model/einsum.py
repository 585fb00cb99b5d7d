"""A parameterised einsum (optionally with bias) whose weights carry logical axis names."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


def default_kernel_init(fan_in_axes: int = 1) -> Callable:
    """Variance scaling with fan-in = the product of the first `fan_in_axes` dims (the contracted ones).

    Every later dim is an output dim: given only the last one, variance scaling would count
    the dims between (heads in a `(embed, heads, head_dim)` q/k/v kernel) as a receptive
    field, multiply them into the fan-in and start those weights sqrt(heads) too small.
    """
    def init(key, shape, dtype=jnp.float32):
        return nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(fan_in_axes)),
            out_axis=tuple(range(fan_in_axes, len(shape))))(key, shape, dtype)
    return init


class Einsum(nn.Module):
    """`y = einsum(eqn, x, w) (+ b)`; `w` of `shape` with logical `axes`, compute in `dtype`."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = default_kernel_init()
    bias_shape: tuple[int, ...] | None = None
    bias_axes: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param("w", nn.with_logical_partitioning(self.kernel_init, self.axes),
                       self.shape, self.param_dtype)
        y = jnp.einsum(eqn, x.astype(self.dtype), jnp.asarray(w, self.dtype))
        if self.bias_shape is not None:
            b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                           self.bias_shape, self.param_dtype)
            y = y + jnp.asarray(b, self.dtype)
        return y
