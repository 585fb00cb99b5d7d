"""Soup ingredients: expanding sweep directories, locating each model, and checking that all
are one architecture (spec without run-time fields; parameter tree, shapes and dtypes once
brought to the first ingredient's layer layout). Nothing here reads parameter arrays.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Sequence

import jax
import numpy as np

from embedder import checkpoint, model_store
from embedder.model.config import RUN_FIELDS, ModelConfig
from embedder.model.layer_stack import is_stacked, match_layer_layout
from embedder.sweep import SWEEP_FILE, read_record

log = logging.getLogger("embedder.soup")


class SoupError(ValueError):
    """An ingredient list that cannot be souped (the message says which ingredient and why)."""


def expand_ingredients(paths: Sequence) -> list[pathlib.Path]:
    """Paths with every sweep directory (one holding sweep.json) replaced by its run workdirs."""
    out = []
    for path in paths:
        path = pathlib.Path(path)
        sweep_file = path / SWEEP_FILE
        if not sweep_file.is_file():
            out.append(path)
            continue
        runs = read_record(path).get("runs", [])
        found = []
        for run in runs:
            workdir = path / run["name"]
            if workdir.is_dir() and any((workdir / n).exists() for n in ("checkpoints", "params")):
                found.append(workdir)
            else:
                log.warning("sweep %s: run %s has no saved model yet; left out of the soup", path, run["name"])
        if not found:
            raise SoupError(f"sweep directory {path} has no run with a saved model "
                            f"({len(runs)} runs listed in {sweep_file})")
        out.extend(found)
    return out


def locate_ingredients(paths: Sequence, *, best_metric: str | None = None, best_mode: str = "max"):
    """`ModelLocation`s of the ingredients (`embedder.model_store.locate_model`, HF folders
    and GGUF files included), checked to be one architecture: the same spec without its run-time fields,
    and the same parameter tree, shapes and dtypes once brought to the first ingredient's
    layer layout (scanned or unrolled). No arrays are read."""
    return _locate(paths, best_metric=best_metric, best_mode=best_mode)[0]


def _locate(paths, *, best_metric, best_mode):
    """`(locations, specs, trees)`: each ingredient's `ModelLocation`, spec and params tree of
    `jax.ShapeDtypeStruct`s (in its own layer layout), checked as `locate_ingredients` says."""
    paths = expand_ingredients(paths)
    if not paths:
        raise SoupError("no ingredients given: pass at least one checkpoint, workdir, export, sweep dir "
                        "or Hugging Face folder")
    locations, specs, trees = [], [], []
    for path in paths:
        if not pathlib.Path(path).exists():
            raise FileNotFoundError(f"ingredient {path} does not exist")
        loc = model_store.locate_model(path, best_metric=best_metric, best_mode=best_mode)
        locations.append(loc)
        specs.append(model_store.load_spec(loc))
        trees.append(_abstract(model_store.param_tree_metadata(loc)))
    names = [str(p) for p in paths]
    _check_specs(specs, names)
    target = layer_layout(trees[0])
    metas = [{k: (tuple(m.shape), np.dtype(m.dtype))
              for k, m in checkpoint.flat_paths(to_layer_layout(tree, spec, target, name)).items()}
             for tree, spec, name in zip(trees, specs, names)]
    check_compatible(metas, names)
    return locations, specs, trees


def _abstract(metadata_tree):
    """A metadata tree (Orbax's or an HF folder's) as `jax.ShapeDtypeStruct` leaves, which
    the `embedder.model.layer_stack` converters take."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), metadata_tree)


def layer_layout(params) -> bool | None:
    """True for the scanned layer layout (`encoder/layers`), False for the unrolled one
    (`encoder/layer_{i}`), None for a tree without an encoder (nothing to convert)."""
    try:
        return is_stacked(params)
    except ValueError:
        return None


def to_layer_layout(params, spec: dict, stacked: bool | None, name: str):
    """`params` of ingredient `name` (its `spec`) in the scanned (`stacked=True`) or unrolled
    layer layout, through `embedder.model.layer_stack.match_layer_layout`; a tree already
    in it (or `stacked=None`, or a tree without an encoder) comes back as it is. Leaves may
    be numpy, jax (sharded) arrays or `jax.ShapeDtypeStruct`s."""
    current = layer_layout(params)
    if stacked is None or current is None or current == stacked:
        return params
    want = "scanned" if stacked else "unrolled"
    try:
        cfg = ModelConfig.from_dict(dict(spec.get("model") or {}, scan_layers=stacked))
        return match_layer_layout(params, cfg)
    except (TypeError, ValueError) as e:
        raise SoupError(f"cannot bring {name} to the {want} layer layout of the soup's first ingredient: {e}") from e


def check_compatible(metas: Sequence[dict], names: Sequence[str]) -> None:
    """Raises `SoupError` at the first path/shape/dtype where an ingredient differs from the first."""
    ref, ref_name = metas[0], names[0]
    for meta, name in zip(metas[1:], names[1:]):
        if list(meta) != list(ref):
            missing = [k for k in ref if k not in meta]
            extra = [k for k in meta if k not in ref]
            first = sorted(missing + extra)[0] if missing or extra else next(
                a for a, b in zip(ref, meta) if a != b)
            where = "missing from" if first in missing else "only in"
            raise SoupError(f"parameter trees differ: {first!r} is {where} {name} (compared with {ref_name}); "
                            "only runs of one architecture can be souped")
        for key, (shape, dtype) in ref.items():
            other_shape, other_dtype = meta[key]
            if other_shape != shape:
                raise SoupError(f"shape mismatch at {key!r}: {shape} in {ref_name}, {other_shape} in {name}")
            if other_dtype != dtype:
                raise SoupError(f"dtype mismatch at {key!r}: {dtype} in {ref_name}, {other_dtype} in {name}")


def _architecture(model: dict) -> dict:
    """A spec's model config without the run-time fields (`RUN_FIELDS`), a missing field
    read as its default (specs written before the field existed)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}

    def norm(v):
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v

    return {k: norm(model.get(k, defaults.get(k))) for k in sorted((set(model) | set(defaults)) - set(RUN_FIELDS))}


def _check_specs(specs, names) -> None:
    """Raises `SoupError` when an ingredient's spec is another architecture than the first's
    (run-time fields such as `scan_layers` aside: layouts are converted)."""
    ref = _architecture(specs[0].get("model") or {})
    for spec, name in zip(specs[1:], names[1:]):
        arch = _architecture(spec.get("model") or {})
        if arch != ref:
            diff = [k for k in ref if arch.get(k) != ref[k]]
            raise SoupError(f"model configs differ between {names[0]} and {name} "
                            f"in {diff}; only runs of one architecture can be souped")
