"""Gradient cache (Gao et al. 2021): full-batch contrastive gradients with one chunk's activations.

Pass 1 embeds every chunk with no activations kept; the loss and its gradient
w.r.t. the embeddings are computed on the whole (global) batch; pass 2 re-runs
each chunk under `jax.vjp` and pulls the cached embedding gradients back into
parameter gradients, accumulated over a `lax.scan`. Chunk `c` embeds with
`fold_in(rng, c)` in both passes, so dropout masks agree between them.

Chunks are strided, row `r` goes to chunk `r % chunks`: with the batch sharded
in contiguous blocks over devices, every chunk then holds an equal share of
every device's rows, so all devices work on every chunk and no rows move.

Packed batches (`embedder.data.packing`) chunk their packed rows instead: each
chunk's `embed_fn` returns the embeddings of every sequence of the batch, zero for
the sequences whose rows are in other chunks (`combine="sum"`), so the full
embeddings are the sum over chunks and every chunk pulls back the whole cotangent.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def split_chunks(x: jax.Array, chunks: int) -> jax.Array:
    """`[B, ...] -> [chunks, B / chunks, ...]`; chunk `c` holds rows `c, c + chunks, c + 2 chunks, ...`."""
    b = x.shape[0]
    if b % chunks:
        raise ValueError(f"gradient cache: batch of {b} rows does not split into {chunks} chunks; "
                         f"set grad_cache_chunks to a divisor of the batch size")
    y = jnp.swapaxes(x.reshape((b // chunks, chunks) + x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))


def merge_chunks(y: jax.Array) -> jax.Array:
    """Inverse of `split_chunks`: `[chunks, B / chunks, ...] -> [B, ...]` in the original row order."""
    chunks, per = y.shape[:2]
    x = jnp.swapaxes(y, 0, 1).reshape((chunks * per,) + y.shape[2:])
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def cached_value_and_grad(
    embed_fn: Callable[[Any, dict, jax.Array], dict],
    loss_fn: Callable[[dict], tuple[jax.Array, dict]],
    params: Any,
    batch: dict,
    rng: jax.Array,
    chunks: int,
    combine: str = "rows",
    loss_params: Any = None,
):
    """`((loss, metrics), grads)` equal to `value_and_grad` of `loss_fn(embed_fn(params, batch, rng))`.

    With `loss_params` (parameters the loss itself trains, e.g. distillation's student -> teacher
    map), `loss_fn(embeddings, loss_params)` and the result is `((loss, metrics), (grads,
    loss_param_grads))`: those gradients come straight from the full-batch loss.

    `embed_fn(params, batch_chunk, rng) -> dict of [rows, ...] embeddings` must treat
    rows independently (true for an encoder); `loss_fn(embeddings) -> (loss, metrics)`
    sees the merged full batch. Exact up to float rounding when `embed_fn` is
    deterministic; with dropout the masks are per chunk (`fold_in(rng, c)`).
    `combine="sum"`: `embed_fn` returns full-batch embeddings that are zero outside the
    chunk's sequences (packed rows), and the chunks' embeddings are summed.
    """
    if chunks < 1:
        raise ValueError(f"gradient cache needs chunks >= 1, got {chunks}")
    if combine not in ("rows", "sum"):
        raise ValueError(f"gradient cache: combine={combine!r}; use 'rows' or 'sum'")
    chunked = jax.tree.map(lambda x: split_chunks(x, chunks), batch)
    index = jnp.arange(chunks)

    def embed_chunk(prm, chunk, c):
        return embed_fn(prm, chunk, jax.random.fold_in(rng, c))

    def forward(_, xs):
        c, chunk = xs
        return None, jax.lax.stop_gradient(embed_chunk(params, chunk, c))

    if combine == "sum":  # accumulate instead of stacking [chunks, N, D]
        first = jax.eval_shape(lambda: embed_chunk(params, jax.tree.map(lambda x: x[0], chunked), 0))

        def forward_sum(acc, xs):
            c, chunk = xs
            return jax.tree.map(jnp.add, acc, jax.lax.stop_gradient(embed_chunk(params, chunk, c))), None

        zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)
        full, _ = jax.lax.scan(forward_sum, zero, (index, chunked))
    else:
        _, embeddings = jax.lax.scan(forward, None, (index, chunked))
        full = jax.tree.map(merge_chunks, embeddings)
    if loss_params is None:
        (loss, metrics), emb_grads = jax.value_and_grad(loss_fn, has_aux=True)(full)
    else:
        (loss, metrics), (emb_grads, loss_param_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(full, loss_params)
    if combine == "sum":  # every chunk pulls back the whole cotangent (zero where it has no rows)
        chunk_grads = jax.tree.map(lambda g: jnp.broadcast_to(g, (chunks,) + g.shape), emb_grads)
    else:
        chunk_grads = jax.tree.map(lambda g: split_chunks(g, chunks), emb_grads)

    # Accumulate in float32 whatever the parameter dtype, so many chunks do not lose bits.
    acc_dtype = lambda p: jnp.promote_types(p.dtype, jnp.float32)

    def backward(acc, xs):
        c, chunk, cotangent = xs
        _, pullback = jax.vjp(lambda prm: embed_chunk(prm, chunk, c), params)
        (grads,) = pullback(cotangent)
        return jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype(p)), params)
    grads, _ = jax.lax.scan(backward, zeros, (index, chunked, chunk_grads))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if loss_params is None:
        return (loss, metrics), grads
    return (loss, metrics), (grads, loss_param_grads)
