"""Orbax array-tree I/O shared by exports and train checkpoints: metadata, restore, tree checks."""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.core import meta

log = logging.getLogger(__name__)

PARAMS_DIR = "params"
MODEL_SPEC_FILE = "model.json"
SOUP_FILE = "soup.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_corrupt"
TRAIN_ITEMS = ("state", "data", "config")
# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" and renames it when complete.
TMP_MARKER = ".orbax-checkpoint-tmp"


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_paths(tree) -> dict[str, Any]:
    """Leaves of `tree` keyed by their '/'-joined path (dicts, lists and dataclasses alike)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat if leaf is not None}


def _unbox(params):
    # Flax logical-partitioning boxes carry metadata, not data; Orbax wants plain arrays.
    return meta.unbox(params)


def _to_json_value(value):
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return value


def read_json(path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_to_json_value(value), f, indent=2, sort_keys=True)
        f.write("\n")
    tmp.replace(path)


def tree_metadata(array_dir: pathlib.Path) -> dict:
    """Shapes/dtypes of an Orbax PyTree directory, as the nested tree Orbax saved."""
    meta = ocp.PyTreeCheckpointHandler().metadata(array_dir)
    return meta.tree if hasattr(meta, "tree") else meta


def restore_tree(array_dir: pathlib.Path, metadata_tree, shardings=None, subtree=None):
    """Restores `metadata_tree` (or its `subtree` key) from an Orbax PyTree directory.

    Without shardings the leaves come back as host numpy arrays, so a checkpoint
    written on any topology loads anywhere. With shardings (a tree matching the
    params, or one Sharding for every leaf) they are restored straight onto them.
    """
    target = metadata_tree[subtree] if subtree else metadata_tree
    if shardings is None:
        item = jax.tree.map(lambda m: np.zeros((0,), m.dtype), target)
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, target)
        _check_same_tree(target, shardings, "checkpoint", "shardings")
        item = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), target, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    if subtree:
        item, restore_args = {subtree: item}, {subtree: restore_args}
    restored = ocp.PyTreeCheckpointHandler().restore(
        array_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=bool(subtree))
    )
    return restored[subtree] if subtree else restored


def _check_same_tree(a, b, a_name: str, b_name: str) -> None:
    """Raises naming the first differing path when `a` and `b` differ in paths or leaf shapes."""
    fa, fb = flat_paths(a), flat_paths(b)
    if set(fa) != set(fb):
        only_a = sorted(k for k in fa if k not in fb)
        only_b = sorted(k for k in fb if k not in fa)
        raise ValueError(
            f"tree structures differ between {a_name} and {b_name}: "
            f"only in {a_name}: {only_a[:5]}, only in {b_name}: {only_b[:5]}"
        )
    for k in sorted(fa):
        sa, sb = getattr(fa[k], "shape", None), getattr(fb[k], "shape", None)
        if sa is not None and sb is not None and tuple(sa) != tuple(sb):
            raise ValueError(f"shape of {k!r} differs: {tuple(sa)} in {a_name}, {tuple(sb)} in {b_name}")
