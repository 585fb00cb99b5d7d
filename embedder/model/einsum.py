"""A parameterised einsum (optionally with bias) whose weights carry logical axis names."""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
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


def _transposed(eqn: str) -> tuple[str, str]:
    """For `X,W->Y`: the equations of dX (`Y,W->X`) and dW (`X,Y->W`)."""
    inputs, out = eqn.replace(" ", "").split("->")
    x, w = inputs.split(",")
    for name, term, others in (("first", x, w + out), ("second", w, x + out)):
        if "." in eqn or len(set(term)) != len(term) or not set(term) <= set(others):
            raise ValueError(f"einsum {eqn!r}: every index of the {name} operand must appear once in it and "
                             "again in the other operand or the output (no ellipsis, traces or lone sums)")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def accumulating_einsum(eqn: str, x, w):
    """`einsum(eqn, x, w)` of two low-precision operands, accumulated in float32 and rounded to
    their dtype once; its gradients are computed the same way.

    The same numbers as a plain bf16 einsum on TPU/GPU (their dots accumulate in f32), but on
    CPU a bf16 x bf16 -> f32 dot is one YNNPACK can run on AMX / AVX512_BF16 units, where
    XLA:CPU turns a bf16 -> bf16 dot into an f32 dot of upcast operands. A plain
    `preferred_element_type` would leave the backward dots f32 x bf16.
    """
    return jnp.einsum(eqn, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _accumulating_fwd(eqn, x, w):
    return accumulating_einsum(eqn, x, w), (x, w)


def _accumulating_bwd(eqn, residuals, ct):
    x, w = residuals
    dx_eqn, dw_eqn = _transposed(eqn)
    ct = ct.astype(x.dtype)
    return (jnp.einsum(dx_eqn, ct, w, preferred_element_type=jnp.float32).astype(x.dtype),
            jnp.einsum(dw_eqn, x, ct, preferred_element_type=jnp.float32).astype(w.dtype))


accumulating_einsum.defvjp(_accumulating_fwd, _accumulating_bwd)


@functools.lru_cache(maxsize=None)
def matmul_groups(eqn: str) -> tuple[int, int] | None:
    """`(free, contracted)` when `eqn` is one matrix product over grouped axes: `X,W->Y` with
    X = free + contracted, W = contracted + W's own axes (the contracted ones in the same order)
    and Y = free + W's own axes, as in `BLD,DF->BLF`, `BLD,DNH->BLNH` or `TNH,NHD->TD`;
    None for anything else (shared batch axes, reordered axes)."""
    inputs, out = eqn.replace(" ", "").split("->")
    x, w = inputs.split(",")
    k = len(set(x) & set(w))
    free = len(x) - k
    if (k and free and x[free:] == w[:k] and out == x[:free] + w[k:]
            and len(set(x + w)) == len(x) + len(w) - k):
        return free, k
    return None


CPU_2D_DOT = "cpu_2d_dot"


def dot_platform() -> str:
    """The platform the computation being traced is compiled for: that of the mesh set with
    `jax.set_mesh` (a TPU topology when compiling ahead of time on a CPU host), else JAX's
    default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def flatten_dots() -> bool:
    """Whether `Einsum` runs its f32 products as 2-D matmuls: when compiling for the CPU. There
    XLA:CPU's layout assignment writes the gradient of a `[B, L, F]` activation transposed
    (`[F, B*L]`) for the weight-gradient dot of a 3-D einsum, a strided copy as slow as the dot it
    feeds; with the token axes merged first it does not. Not for bf16 / f16 products (YNNPACK
    dots), which are slower so, nor on TPU / GPU, whose compilers choose their own layouts."""
    return dot_platform() == "cpu"


def einsum_product(eqn: str, x, w, accumulate: bool = False):
    """`einsum(eqn, x, w)`: with `accumulating_einsum` when `accumulate` (bf16 / f16 compute:
    f32 accumulation, native dots); otherwise as one 2-D matmul when `eqn` is a product over
    grouped axes (`matmul_groups`) and `flatten_dots()`, the same sums (named `cpu_2d_dot` in
    the compiled program)."""
    if accumulate:
        return accumulating_einsum(eqn, x, w)
    groups = matmul_groups(eqn) if flatten_dots() else None
    if groups is None:
        return jnp.einsum(eqn, x, w)
    free, k = groups
    lead, inner, tail = x.shape[:free], x.shape[free:], w.shape[k:]
    with jax.named_scope(CPU_2D_DOT):
        y = jnp.dot(x.reshape(math.prod(lead), math.prod(inner)), w.reshape(math.prod(inner), math.prod(tail)))
        return y.reshape(lead + tail)


# The variable collection of int8 kernels (`int8_einsum`); `Embedder(quantized_compute="int8")`.
INT8_COLLECTION = "int8"


def int8_einsum(eqn: str, x, q, scale):
    """`einsum(eqn, x, q * scale)` computed in integers: `x` quantised per row (symmetric, its
    absmax over the contracted axes maps to 127), an s8 x s8 -> s32 dot with the int8 kernel `q`
    (one f32 `scale` per output channel, `[*output axes, 1]`), both scales applied after. The
    product must be one matrix product over grouped axes (`matmul_groups`)."""
    groups = matmul_groups(eqn)
    if groups is None:
        raise ValueError(f"int8 einsum {eqn!r}: not a product over grouped axes")
    free, k = groups
    lead, inner, tail = x.shape[:free], x.shape[free:], q.shape[k:]
    rows = x.astype(jnp.float32).reshape(math.prod(lead), math.prod(inner))
    x_scale = jnp.max(jnp.abs(rows), axis=1, keepdims=True) / 127.0
    x_scale = jnp.where(x_scale > 0, x_scale, 1.0)
    xq = jnp.clip(jnp.round(rows / x_scale), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot(xq, q.reshape(math.prod(inner), math.prod(tail)), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * x_scale * scale.reshape(1, -1)
    return y.reshape(lead + tail)


class Einsum(nn.Module):
    """`y = einsum(eqn, x, w) (+ b)`; `w` of `shape` with logical `axes`, compute in `dtype`.

    With an int8 kernel in the `INT8_COLLECTION` collection (`{"q", "scale"}` at this module's
    path, in place of the `w` param) the product is `int8_einsum`."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = default_kernel_init()
    bias_shape: tuple[int, ...] | None = None
    bias_axes: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, eqn: str, x):
        if self.has_variable(INT8_COLLECTION, "w"):
            kernel = self.get_variable(INT8_COLLECTION, "w")
            y = int8_einsum(eqn, x, kernel["q"], kernel["scale"]).astype(self.dtype)
        else:
            w = self.param("w", nn.with_logical_partitioning(self.kernel_init, self.axes),
                           self.shape, self.param_dtype)
            x, w = x.astype(self.dtype), jnp.asarray(w, self.dtype)
            y = einsum_product(eqn, x, w, accumulate=jnp.dtype(self.dtype).itemsize < 4)
        if self.bias_shape is not None:
            b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                           self.bias_shape, self.param_dtype)
            y = y + jnp.asarray(b, self.dtype)
        return y
