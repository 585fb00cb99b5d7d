"""Convert params between the unrolled layout (`encoder/layer_{i}/...`) and the scanned one
(`encoder/layers/...`, leaves stacked on a leading [num_layers] axis); pure tree functions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embedder.model.config import ModelConfig
from embedder.model.scan import LAYER_AXIS, STACK_NAME

_AXIS_PARAMS = {nn.PARTITION_NAME: LAYER_AXIS}


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def layer_name(i: int) -> str:
    """Name of the i-th block in the unrolled layout."""
    return f"layer_{i}"


def _encoder(params: dict, what: str) -> dict:
    if not isinstance(params, Mapping) or "encoder" not in params:
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(f"{what}: expected a params tree with an 'encoder' entry (the tree that "
                         f"model.apply takes as {{'params': tree}}), got {keys}")
    return params["encoder"]


def _is_numpy(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


def _stack(leaves, path: str):
    if _is_box(leaves[0]):
        # Boxed (logically partitioned) leaves: the box gains the "layers" axis name, as
        # nn.scan's metadata_params gives it.
        stacked = _stack([x.unbox() for x in leaves], path)
        return leaves[0].replace_boxed(stacked).add_axis(0, _AXIS_PARAMS)
    shapes = {tuple(np.shape(x)) for x in leaves}
    if len(shapes) != 1:
        raise ValueError(f"stack_layers: leaf {path} has different shapes across layers {sorted(shapes)}; "
                         "the blocks of a scanned model must be identical")
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):  # abstract trees (eval_shape)
        return jax.ShapeDtypeStruct((len(leaves),) + shapes.pop(), leaves[0].dtype)
    # numpy stays numpy (conversions run on the host), anything else becomes a jax array.
    return np.stack(leaves) if all(_is_numpy(x) for x in leaves) else jnp.stack(leaves)


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Unrolled params (`encoder/layer_0 ... layer_{L-1}`) -> scanned (`encoder/layers`).

    Leaves may be numpy arrays, jax arrays, `jax.ShapeDtypeStruct`s or boxed (partitioned) ones.

    Every other entry is kept as is (the same objects); numpy leaves give numpy arrays and
    logically partitioned boxes gain the leading "layers" axis name."""
    enc = _encoder(params, "stack_layers")
    names = [layer_name(i) for i in range(cfg.num_layers)]
    missing = [n for n in names if n not in enc]
    if missing:
        hint = (" (it is already stacked: its config should say scan_layers=True)"
                if STACK_NAME in enc else "")
        raise ValueError(f"stack_layers: params lack encoder/{missing[0]} ({len(missing)} of "
                         f"{cfg.num_layers} layers missing){hint}; encoder entries: {sorted(enc)}")
    extra = sorted(k for k in enc if k.startswith("layer_") and k not in names)
    if extra or STACK_NAME in enc:
        raise ValueError(f"stack_layers: encoder has entries beyond num_layers={cfg.num_layers} "
                         f"({extra or [STACK_NAME]}); is the config from the same model?")
    first = jax.tree_util.tree_structure(enc[names[0]], is_leaf=_is_box)
    for n in names[1:]:
        if jax.tree_util.tree_structure(enc[n], is_leaf=_is_box) != first:
            raise ValueError(f"stack_layers: encoder/{n} has different parameters than "
                             f"encoder/{names[0]}; only identical blocks can be stacked")
    flat = [jax.tree_util.tree_flatten_with_path(enc[n], is_leaf=_is_box)[0] for n in names]
    leaves = [_stack([f[j][1] for f in flat], jax.tree_util.keystr(flat[0][j][0]))
              for j in range(len(flat[0]))]
    out = {k: v for k, v in enc.items() if k not in names}
    out[STACK_NAME] = jax.tree_util.tree_unflatten(first, leaves)
    return {**params, "encoder": out}


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Scanned params (`encoder/layers`, leading [num_layers] axis) -> unrolled (`layer_{i}`).

    Leaves are slices (numpy views, no copies); every other entry is kept as is."""
    enc = _encoder(params, "unstack_layers")
    if STACK_NAME not in enc:
        hint = (" (it is unrolled already: its config should say scan_layers=False)"
                if layer_name(0) in enc else "")
        raise ValueError(f"unstack_layers: params lack encoder/{STACK_NAME}{hint}; "
                         f"encoder entries: {sorted(enc)}")
    stacked = enc[STACK_NAME]

    def check(path, x):
        if _is_box(x):
            x = x.unbox()
        if not np.shape(x) or np.shape(x)[0] != cfg.num_layers:
            raise ValueError(f"unstack_layers: encoder/{STACK_NAME}{jax.tree_util.keystr(path)} has "
                             f"shape {tuple(np.shape(x))}, expected a leading axis of "
                             f"num_layers={cfg.num_layers}; is the config from the same model?")

    def take(x, i):
        if _is_box(x):
            return x.replace_boxed(take(x.unbox(), i)).remove_axis(0, _AXIS_PARAMS)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        return x[i]

    jax.tree_util.tree_map_with_path(check, stacked, is_leaf=_is_box)
    out = {k: v for k, v in enc.items() if k != STACK_NAME}
    for i in range(cfg.num_layers):
        out[layer_name(i)] = jax.tree.map(lambda x, i=i: take(x, i), stacked, is_leaf=_is_box)
    return {**params, "encoder": out}


def is_stacked(params: dict) -> bool:
    """Whether `params` is in the scanned layout."""
    return STACK_NAME in _encoder(params, "is_stacked")


def match_layer_layout(params: dict, cfg: ModelConfig) -> Any:
    """`params` in the layout `cfg.scan_layers` asks for, converting whichever it is in
    (e.g. an unrolled export loaded into a scanned training run)."""
    stacked = is_stacked(params)
    if cfg.scan_layers and not stacked:
        return stack_layers(params, cfg)
    if stacked and not cfg.scan_layers:
        return unstack_layers(params, cfg)
    return params
