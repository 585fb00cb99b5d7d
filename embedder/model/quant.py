"""Weight quantisation of our param trees: the schemes (int8 per channel, int4 per block, and
EmbeddingGemma's mixed one) as module-path rules, the symmetric absmax quantiser, int4 packing,
and the straight-through fake quantiser that quantisation-aware training runs.

One quantiser serves training (`fake_quantize_params`, in the forward of a model whose config
sets `quant_scheme`), post-training quantisation and the on-disk export (`quantize_params` /
`dequantize_params`): a QAT model's forward is the forward of its exported integer weights.

Which leaves: every `Einsum` kernel (`.../w`: attention q/k/v/o, feed-forward gate/up/down,
head projections) and the token embedding tables (`embedding`, `word_embedding`); norms,
biases, BERT's position and type tables stay float. A kernel's scale runs over its contracted
axes (the input features: one scale per output channel, or per `block` of input features); a
table's over its width (one per token row, or per block of it) - the lookup reads a row.

A table's scales being per row, quantisation-aware training fake-quantises only the rows a
lookup gathers (`lookup_rows`): the same values, and straight through the same gradient, as the
whole quantised table, without quantising the whole table on every forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4", "mixed")
TABLE_NAMES = ("embedding", "word_embedding")
STACK_NAME = "layers"   # embedder.model.scan.STACK_NAME: a leading [num_layers] axis


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """`bits` (8 or 4) symmetric integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1], one f32 scale per
    output channel (`block=0`) or per `block` consecutive input features of a channel."""

    bits: int
    block: int = 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block": self.block}


def scheme_rules(scheme: str, block: int = 32) -> tuple[tuple[str, QuantFormat], ...]:
    """`(path regex, format)` rules of a scheme, first match wins: `int8` per channel everywhere,
    `int4` per `block` everywhere, `mixed` (EmbeddingGemma) int8 per channel in attention and
    int4 per `block` in the embeddings, feed-forward and head projections."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantisation scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    if block < 0:
        raise ValueError(f"quantisation block {block} must be >= 0 (0: one scale per channel)")
    int8, int4 = QuantFormat(8, 0), QuantFormat(4, block)
    if scheme == "int8":
        return ((r".*", int8),)
    if scheme == "int4":
        return ((r".*", int4),)
    return ((r"(^|/)attention/", int8), (r".*", int4))


def is_table(path: str) -> bool:
    """Whether the leaf at `path` is a token embedding table (`TABLE_NAMES`)."""
    return path.split("/")[-1] in TABLE_NAMES


def reduction_axes(path: str, ndim: int) -> tuple[int, ...] | None:
    """The axes a leaf's scales run over (None: the leaf is not quantised). `path` is the leaf's
    '/'-joined path in the model's params (`encoder/layer_0/attention/o/w`)."""
    parts = path.split("/")
    lead = 1 if STACK_NAME in parts[:-1] else 0   # stacked layers: per layer
    if is_table(path):
        return (ndim - 1,)
    if parts[-1] != "w" or "teacher_projection" in parts:
        return None
    # The attention output kernel `[heads, head_dim, embed]` contracts two axes (einsum TNH,NHD->TD);
    # every other kernel contracts its first (`default_kernel_init`'s fan-in axes, the same).
    contracted = 2 if len(parts) >= 2 and parts[-2] == "o" else 1
    return tuple(range(lead, lead + contracted))


def leaf_format(path: str, rules) -> QuantFormat | None:
    for pattern, fmt in rules:
        if re.search(pattern, path):
            return fmt
    return None


def plan(flat_shapes: dict[str, tuple[int, ...]], scheme: str, block: int = 32) -> dict[str, dict]:
    """`{path: {"bits", "block", "axes", "shape"}}` for the quantised leaves of a flat
    `{path: shape}`. A block that does not divide a leaf's contracted size falls back to one
    scale per channel for that leaf (the plan records what was done)."""
    rules = scheme_rules(scheme, block)
    out = {}
    for path, shape in flat_shapes.items():
        axes = reduction_axes(path, len(shape))
        fmt = leaf_format(path, rules) if axes is not None else None
        if fmt is None:
            continue
        k = math.prod(shape[a] for a in axes)
        b = fmt.block if fmt.block and k % fmt.block == 0 and k > fmt.block else 0
        out[path] = {"bits": fmt.bits, "block": b, "axes": list(axes), "shape": list(shape)}
    return out


def _grouped(xp, w, axes, block):
    """`w` with the reduced axes moved last, flattened, and split into blocks:
    `[*kept, nblocks, block]`, and the permutation used."""
    kept = [a for a in range(w.ndim) if a not in axes]
    perm = kept + list(axes)
    moved = xp.transpose(w, perm)
    k = math.prod(w.shape[a] for a in axes)
    b = block or k
    return moved.reshape(moved.shape[:len(kept)] + (k // b, b)), perm


def _ungrouped(xp, grouped, shape, perm):
    moved = grouped.reshape(tuple(shape[p] for p in perm))
    return xp.transpose(moved, np.argsort(perm))


def quantize_array(w, info: dict, xp=np):
    """`(q, scale)`: integers (int8, the shape of `w`) and f32 scales `[*kept axes, nblocks]`
    with `w ~ q * scale`. Symmetric absmax: each block's largest magnitude maps to `qmax`, so
    nothing is clipped; an all-zero block gets scale 1."""
    qmax = (1 << (info["bits"] - 1)) - 1
    g, perm = _grouped(xp, xp.asarray(w, xp.float32), tuple(info["axes"]), info["block"])
    absmax = xp.max(xp.abs(g), axis=-1)
    scale = xp.where(absmax > 0, absmax / qmax, xp.ones_like(absmax)).astype(xp.float32)
    q = xp.clip(xp.round(g / scale[..., None]), -qmax, qmax)
    return _ungrouped(xp, q, w.shape, perm).astype(xp.int8), scale


def dequantize_array(q, scale, info: dict, dtype=np.float32, xp=np):
    """`q * scale` in the layout of `q`, as `dtype`."""
    g, perm = _grouped(xp, xp.asarray(q, xp.float32), tuple(info["axes"]), info["block"])
    return _ungrouped(xp, g * scale[..., None], q.shape, perm).astype(dtype)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two int4 values a byte, `[ceil(n / 2)]` uint8 of the flattened `q` (values in [-8, 7]):
    even elements in the low nibble, odd in the high one."""
    flat = np.asarray(q, np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{flat.min()}, {flat.max()}]")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape) -> np.ndarray:
    """The int8 array of `shape` that `pack_int4` packed (sign-extended nibbles)."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    both = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1).astype(np.int16)
    values = ((both ^ 8) - 8).astype(np.int8)
    n = math.prod(shape)
    return values[:n].reshape(tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def straight_through(w, info_key):
    """`dequantize(quantize(w))` in the forward; the identity in the backward (the
    straight-through estimator: the gradient reaches the float weights unchanged)."""
    info = dict(info_key)
    q, scale = quantize_array(w, info, xp=jnp)
    return dequantize_array(q, scale, info, w.dtype, xp=jnp)


straight_through.defvjp(lambda w, k: (straight_through(w, k), None), lambda k, _, ct: (ct,))


def _info_key(info: dict) -> tuple:
    return (("axes", tuple(info["axes"])), ("bits", info["bits"]), ("block", info["block"]))


def _flat(params) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _map_leaves(params, fn):
    """`params` (nested dicts) with each leaf replaced by `fn(path, leaf)`."""
    paths = list(_flat(params))
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [fn(p, leaf) for p, leaf in zip(paths, leaves)])


def fake_quantize_params(params, scheme: str, block: int = 32, prefix: str = "", tables: bool = True):
    """`params` with every leaf the scheme quantises replaced by its straight-through fake
    quantisation (JAX arrays; differentiable). `prefix` is the path of `params` in the model's
    tree when they are a subtree (`encoder`). `tables=False` leaves the token embedding tables
    float: their lookups quantise the rows they gather (`lookup_rows`)."""
    full = (prefix + "/") if prefix else ""
    table = plan({full + p: tuple(np.shape(v)) for p, v in _flat(params).items()}, scheme, block)

    def one(path, leaf):
        info = table.get(full + path)
        if info is None or (not tables and is_table(full + path)):
            return leaf
        return straight_through(leaf, _info_key(info))

    return _map_leaves(params, one)


def fake_quantize_rows(rows, path: str, table_shape, scheme: str, block: int = 32):
    """`rows` (`[..., width]`, gathered from the token table at `path` of shape `table_shape`)
    fake-quantised straight through as `fake_quantize_params` quantises that table: the table's
    scales run over its width (one per row, or per block of it), so each row gets the values of
    its row of the quantised table, and its gradient reaches the table unchanged."""
    info = plan({path: tuple(table_shape)}, scheme, block).get(path)
    if info is None:
        return rows
    if info["axes"] != [len(table_shape) - 1] or rows.shape[-1] != table_shape[-1]:
        raise ValueError(f"{path}: rows {rows.shape} of a table {tuple(table_shape)} are not quantised per row")
    return straight_through(rows, _info_key(dict(info, axes=[rows.ndim - 1])))


def lookup_rows(table, ids, dtype, path: str, scheme: str = "", block: int = 32):
    """`table[ids]` as `dtype`. With a quantisation `scheme`, the gathered rows are fake-quantised
    (`fake_quantize_rows`) before the cast, as the whole table was before it."""
    if not scheme:
        return jnp.take(jnp.asarray(table, dtype), ids, axis=0)
    rows = jnp.take(table, ids, axis=0)
    return jnp.asarray(fake_quantize_rows(rows, path, table.shape, scheme, block), dtype)


def quantize_params(params, scheme: str, block: int = 32):
    """Post-training quantisation of a (host) params tree: `(quantized, table)`, where each
    quantised leaf of `quantized` is `{"q": int8 array, "scale": f32 array}` and `table` is
    `plan(...)`'s entry per quantised path."""
    table = plan({p: tuple(np.shape(v)) for p, v in _flat(params).items()}, scheme, block)

    def one(path, leaf):
        info = table.get(path)
        if info is None:
            return leaf
        q, scale = quantize_array(np.asarray(leaf), info)
        return {"q": q, "scale": scale}

    return _map_leaves(params, one), table


def dequantize_params(quantized, table: dict, dtype=np.float32):
    """The float params of `quantize_params`' output (`{"q", "scale"}` leaves back to arrays)."""
    def walk(node, path):
        if isinstance(node, dict) and path in table and set(node) == {"q", "scale"}:
            return dequantize_array(np.asarray(node["q"]), np.asarray(node["scale"]), table[path], dtype)
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return node
    return walk(quantized, "")


# On disk (a quantised parameter export, `python -m embedder.quantize`): each quantised leaf is
# `{"q": ..., "scale": f32}`, `q` int8 of the leaf's shape for 8 bits, int4 packed two a byte
# (`pack_int4`) for 4 bits; the export's spec names the scheme and every leaf's plan entry.

def _map_quantized(tree, table: dict, fn):
    def walk(node, path):
        if isinstance(node, dict) and path in table and set(node) == {"q", "scale"}:
            return fn(node, table[path])
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return node
    return walk(tree, "")


def to_stored(quantized, table: dict):
    """`quantize_params`' output with 4-bit leaves packed two values a byte."""
    return _map_quantized(quantized, table, lambda n, info: {
        "q": pack_int4(n["q"]) if info["bits"] == 4 else np.asarray(n["q"], np.int8),
        "scale": np.asarray(n["scale"], np.float32)})


def from_stored(stored, table: dict):
    """`to_stored`'s tree back to `quantize_params`' (int8 `q` of each leaf's shape)."""
    return _map_quantized(stored, table, lambda n, info: {
        "q": unpack_int4(n["q"], info["shape"]) if info["bits"] == 4 else np.asarray(n["q"], np.int8),
        "scale": np.asarray(n["scale"], np.float32)})


def logical_metadata(stored_metadata, table: dict, dtype=np.float32):
    """A stored tree's metadata with each quantised leaf shown as the float array it loads as."""
    return _map_quantized(stored_metadata, table,
                          lambda n, info: jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(dtype)))


def split_int8_kernels(params):
    """`{"params": ..., INT8_COLLECTION: ...}` for `Einsum`'s integer path: every kernel
    (`.../w`, unrolled layers) quantised to int8 with one scale per output channel, moved out of
    the params into the int8 collection; embedding tables, norms and biases stay float."""
    from embedder.model.einsum import INT8_COLLECTION
    flat = _flat(params)
    if any(STACK_NAME in p.split("/")[:-1] for p in flat):
        raise ValueError("int8 compute needs the unrolled layer layout (scan_layers=False)")
    kernels = {}

    def walk(node, path):
        out = {}
        for k, v in node.items():
            p = f"{path}/{k}" if path else k
            axes = reduction_axes(p, np.ndim(v)) if not isinstance(v, dict) else None
            if isinstance(v, dict):
                out[k] = walk(v, p)
            elif k == "w" and axes is not None:
                q, scale = quantize_array(np.asarray(v, np.float32), {"bits": 8, "block": 0, "axes": list(axes)})
                node_k = kernels
                for part in p.split("/")[:-1]:
                    node_k = node_k.setdefault(part, {})
                node_k["w"] = {"q": q, "scale": scale}
            else:
                out[k] = v
        return out

    rest = walk(params, "")
    return {"params": rest, INT8_COLLECTION: kernels}
