"""The device mesh from the config (one or several slices), the logical-axis rules, and
host <-> global array placement."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DEFAULT_AXES = ("data", "fsdp", "tensor")
# Mesh axes that split the batch (data parallelism, and FSDP which is data
# parallelism with sharded parameters).
DATA_AXES = ("data", "fsdp")

# Logical name -> mesh axis. A logical name may appear more than once: Flax
# takes the first rule whose mesh axis is not already used by an earlier
# dimension of the same array, so activations `[batch, length, embed]` put the
# batch on (data, fsdp) and leave `embed` replicated, while the parameter
# `[vocab, embed]` puts `embed` on fsdp (FSDP) and `vocab` on tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("proj", "tensor"),
    ("layers", None),
    ("norm", None),
    ("position", None),
    ("types", None),
)


class ShardingError(ValueError):
    """A mesh or sharding request that cannot work on the available devices."""


def _mesh_fields(mesh_cfg) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if mesh_cfg is None:
        return DEFAULT_AXES, (-1, 1, 1)
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d=None: getattr(mesh_cfg, k, d)
    axes = tuple(get("axes", DEFAULT_AXES))
    raw = get("shape", (-1,) + (1,) * (len(axes) - 1))
    try:
        if isinstance(raw, str):
            raise ValueError(raw)
        shape = tuple(int(s) for s in raw)
    except (TypeError, ValueError):
        raise ShardingError(
            f"mesh.shape={raw!r} is not a tuple of integers; give one size per axis {axes}, "
            "e.g. --config.mesh.shape='(-1,1,1)'") from None
    if len(axes) != len(shape):
        raise ShardingError(
            f"mesh.axes {axes} and mesh.shape {shape} have different lengths; "
            "give one size per axis, e.g. --config.mesh.shape='(-1,1,1)'")
    return axes, shape


def resolve_mesh_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills in one `-1` entry and checks the product equals the device count."""
    shape = list(shape)
    auto = [i for i, s in enumerate(shape) if s == -1]
    if len(auto) > 1:
        raise ShardingError(
            f"mesh.shape {tuple(shape)} has more than one -1; at most one axis can be auto-filled")
    for name, s in zip(axes, shape):
        if s == 0 or s < -1:
            raise ShardingError(f"mesh axis '{name}' has invalid size {s}; use a positive size or -1")
    fixed = math.prod(s for s in shape if s != -1)
    if auto:
        if num_devices % fixed:
            named = ", ".join(f"{a}={s}" for a, s in zip(axes, shape) if s != -1)
            raise ShardingError(
                f"cannot auto-fill mesh axis '{axes[auto[0]]}': the fixed axes ({named}) use {fixed} "
                f"devices, which does not divide the {num_devices} available; choose sizes whose "
                f"product divides {num_devices}")
        shape[auto[0]] = num_devices // fixed
    elif fixed != num_devices:
        named = ", ".join(f"{a}={s}" for a, s in zip(axes, shape))
        raise ShardingError(
            f"mesh ({named}) needs {fixed} devices but {num_devices} are available; set one axis "
            "to -1 to fill it automatically, e.g. --config.mesh.shape='(-1,1,1)'")
    return tuple(shape)


def slice_count(devices: Sequence[Any]) -> int:
    """How many TPU slices `devices` span (their `slice_index`); 1 on other platforms."""
    if not devices or devices[0].platform != "tpu":
        return 1
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg=None, devices: Sequence[Any] | None = None, num_slices: int | None = None) -> Mesh:
    """Builds the device mesh from `mesh_cfg` (`axes`, `shape` with one -1 allowed). Over several
    slices (`num_slices`, default: those `devices` span) the `data` axis spans them (DCN) and
    every other axis stays inside a slice (ICI)."""
    axes, shape = _mesh_fields(mesh_cfg)
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    shape = resolve_mesh_shape(axes, shape, len(devices))
    axis_types = (AxisType.Auto,) * len(axes)
    num_slices = slice_count(devices) if num_slices is None else int(num_slices)
    if num_slices > 1:
        if "data" not in axes or shape[axes.index("data")] % num_slices:
            raise ShardingError(
                f"mesh {dict(zip(axes, shape))} cannot span {num_slices} slices: the 'data' axis must be a "
                f"multiple of the slice count; set --config.mesh.shape so that data is a multiple of {num_slices}")
        ici, dcn = list(shape), [1] * len(shape)
        ici[axes.index("data")] //= num_slices
        dcn[axes.index("data")] = num_slices
        return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices), axes, axis_types=axis_types)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, axes, axis_types=axis_types)
    # Explicit device list (a subset, or an AOT topology's devices).
    try:
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # topology-unaware fallback: plain row-major order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, axes, axis_types=axis_types)


def logical_rules(cfg=None) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules: `cfg.sharding.rules` when given, else the defaults."""
    rules = None
    if cfg is not None:
        sharding_cfg = cfg.get("sharding") if hasattr(cfg, "get") else None
        if sharding_cfg is not None:
            rules = sharding_cfg.get("rules") if hasattr(sharding_cfg, "get") else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for name, axis in rules:
        out.append((name, tuple(axis) if isinstance(axis, list) else axis))
    return tuple(out)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def host_row_multiple(mesh: Mesh, chunks: int = 1) -> int:
    """What each host's batch row count must be a multiple of for `host_to_global` to split the
    global rows evenly over the data-parallel devices (e.g. the row count of packed batches),
    and, with `chunks` gradient-cache chunks, every chunk too."""
    total = data_parallel_size(mesh) * max(1, int(chunks))
    return total // math.gcd(total, jax.process_count())


def batch_spec(mesh: Mesh, ndim: int = 1) -> P:
    axes = data_axes(mesh)
    lead = axes if len(axes) > 1 else (axes[0] if axes else None)
    return P(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a batch array: leading dim over the data-parallel axes."""
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, path: str) -> P:
    """Drops mesh axes from dimensions they do not divide (e.g. MQA's single kv head)."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = []
        size = 1
        for n in names:
            if n not in mesh.shape:  # the rules name an axis this mesh does not have
                continue
            if dim % (size * mesh.shape[n]) == 0:
                kept.append(n)
                size *= mesh.shape[n]
            else:
                log.info("param %s: dim %d not divisible by mesh axis %s=%d; replicating that dim",
                         path, dim, n, mesh.shape[n])
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*out)


def param_shardings(abstract_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a (possibly `nn.LogicallyPartitioned`-boxed) abstract tree.

    Leaves without logical annotations are replicated. A mesh axis that does not
    divide a dimension is dropped for that dimension (logged), never an error.
    """
    logical = nn.get_partition_spec(abstract_params)
    unboxed = nn.meta.unbox(abstract_params)
    mesh_specs = nn.logical_to_mesh(logical, rules)

    def one(path, spec, leaf):
        name = jax.tree_util.keystr(path)
        if not isinstance(spec, P):
            spec = P()
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh, name))

    return jax.tree_util.tree_map_with_path(
        one, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P) or x is None)


def check_sufficiently_sharded(params, shardings, mesh: Mesh, *, min_size: int = 1 << 20,
                               raise_error: bool = False) -> list[str]:
    """Lists parameters of >= `min_size` elements that are fully replicated on a multi-device
    parameter-sharding mesh (fsdp or tensor > 1). Logs a warning, or raises with `raise_error`."""
    model_axes = [a for a in mesh.axis_names if a not in ("data",) and mesh.shape[a] > 1]
    if not model_axes:
        return []
    bad = []

    def visit(path, leaf, sharding):
        size = math.prod(getattr(leaf, "shape", ()))
        if size >= min_size and all(e is None for e in sharding.spec):
            bad.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}")

    jax.tree_util.tree_map_with_path(visit, nn.meta.unbox(params), shardings)
    if bad:
        msg = (f"{len(bad)} large parameter(s) are replicated although the mesh has "
               f"{', '.join(f'{a}={mesh.shape[a]}' for a in model_axes)}: {'; '.join(bad[:5])}. "
               "Give them logical axis names that the rules map to 'fsdp' or 'tensor'.")
        if raise_error:
            raise ShardingError(msg)
        log.warning(msg)
    return bad


def _check_batch_divisible(name: str, global_rows: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    if global_rows % dp:
        raise ShardingError(
            f"batch entry '{name}' has {global_rows} rows, not divisible by the data-parallel size "
            f"{dp} ({' x '.join(f'{a}={mesh.shape[a]}' for a in data_axes(mesh))}); "
            f"choose batch_size as a multiple of {dp}")


def host_to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles each host's slice of the batch into global `jax.Array`s (leading dim sharded)."""
    out = {}
    n_proc = jax.process_count()
    for name, local in batch.items():
        local = np.asarray(local)
        _check_batch_divisible(name, local.shape[0] * n_proc, mesh)
        sharding = batch_sharding(mesh, local.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, local)
    return out


def global_batch_shardings(batch_shapes: dict, mesh: Mesh) -> dict:
    """Batch sharding for each entry of a dict of arrays / ShapeDtypeStructs."""
    return {k: batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
