"""`--compile_only [--topology v5e:4x4 --num_slices 2]`: compile the real train step ahead of time on
abstract inputs (no TPU, no parameter allocated); print per-chip memory against HBM and model FLOPs."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
import time
from typing import Any, Sequence

import jax
from jax.experimental import topologies

from embedder import sharding
from embedder.data.abstract_batch import global_batch_shapes
from embedder.data.batch_schema import sequence_shapes
from embedder.train.setup import build_run
from embedder.train.state import abstract_state

log = logging.getLogger("embedder.train.compile_only")

GiB = 2**30

# Usable HBM per device as the TPU compiler reports it in RESOURCE_EXHAUSTED errors
# (v4 with one device per chip, "megacore").
HBM_BYTES = {
    "v4": 30.75 * GiB,
    "v5e": 15.75 * GiB,
    "v5p": 95.74 * GiB,
    "v6e": 31.25 * GiB,
}
_TOPOLOGY_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
# Peak dense bf16 FLOP/s per chip, for the "ideal step time" line (public spec sheets).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}


class CompileOnlyError(ValueError):
    """A request `--compile_only` cannot serve (bad topology name, missing libtpu, bad mesh)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str             # e.g. "v5e:4x4"
    generation: str       # v4 | v5e | v5p | v6e
    dims: tuple[int, ...]
    num_slices: int

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_bytes(self) -> float:
        return HBM_BYTES[self.generation]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """`v5e:4x4`, `v5p:2x2x4`, `v6e:8x8`, `v4:2x2x2` (the names `get_topology_desc` takes)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name.strip())
    if not m:
        raise CompileOnlyError(
            f"--topology {name!r} is not GENERATION:AxB[xC] with GENERATION in {sorted(HBM_BYTES)}; "
            "e.g. --topology v5e:4x4 (not the accelerator-type name v5litepod-16)")
    gen = m.group(1)
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if len(dims) != _TOPOLOGY_DIMS[gen] or min(dims) < 1:
        example = "4x4" if _TOPOLOGY_DIMS[gen] == 2 else "2x2x4"
        raise CompileOnlyError(f"--topology {name!r}: {gen} has {_TOPOLOGY_DIMS[gen]} positive dimensions, "
                               f"e.g. {gen}:{example}")
    if num_slices < 1:
        raise CompileOnlyError(f"--num_slices must be >= 1, got {num_slices}")
    return Topology(name.strip(), gen, dims, num_slices)


def topology_devices(topo: Topology) -> list:
    """The TPU devices of `topo` for AOT compilation (needs libtpu: `pip install -e .[tpu]`)."""
    if importlib.util.find_spec("libtpu") is None:
        raise CompileOnlyError(
            f"--topology {topo.name} needs the TPU compiler: pip install -e '.[tpu]' (libtpu 0.0.42.* for "
            "jax 0.10.2); no TPU is needed")
    # Compiling only never touches a TPU, so several compiles (or a test run) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Hosts hold 2x2 chips on multi-host slices; smaller slices sit on one host.
    bounds = tuple(min(d, 2) for d in topo.dims[:2]) + (1,)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name, chip_config_name="megacore" if topo.generation == "v4" else "default",
            chips_per_host_bounds=bounds, num_slices=topo.num_slices, wrap=(False, False, False))
    except Exception as e:
        raise CompileOnlyError(f"cannot get TPU topology {topo.name!r} x{topo.num_slices}: {e}") from e
    return list(desc.devices)


# -- FLOPs -------------------------------------------------------------------------------


def embedding_param_count(model_cfg) -> int:
    """Parameters of the lookup tables (token, and for BERT position and type embeddings)."""
    n = model_cfg.vocab_size * model_cfg.hidden_size
    if model_cfg.family == "bert":
        n += (model_cfg.max_position_embeddings + model_cfg.type_vocab_size) * model_cfg.hidden_size
    return n


def _attended_pairs(length: int, window: int | None) -> int:
    """Query-key pairs (i, j) in a sequence of `length` with |i - j| < window (all pairs without one)."""
    if window is None or window >= length:
        return length * length
    # The diagonal, plus each offset d = 1..window-1 on both sides (length - d pairs each).
    return length + 2 * sum(length - d for d in range(1, window))


def model_flops_per_step(model_cfg, non_embedding_params: int, seqs: Sequence[tuple[int, int]]) -> dict:
    """Model FLOPs of one optimizer step (forward + backward, no recompute counted).

    dense     = 6 * non-embedding params * tokens
    attention = 12 * sum over sequences and layers of (attended query-key pairs * num_heads * head_dim)
                (QK^T and AV, 2 FLOPs per MAC, x3 for forward + backward; a global layer
                attends L^2 pairs, a local one the pairs with |i - j| < window)
    """
    tokens = sum(n * length for n, length in seqs)
    dense = 6 * non_embedding_params * tokens
    width = model_cfg.num_heads * model_cfg.head_dim
    layer_types = model_cfg.layer_types or ("global",) * model_cfg.num_layers
    attn = 0
    for n, length in seqs:
        for t in layer_types:
            attn += 12 * n * _attended_pairs(length, model_cfg.sliding_window if t == "local" else None) * width
    return {"tokens": tokens, "dense": dense, "attention": attn, "total": dense + attn}


# -- abstract inputs ----------------------------------------------------------------------


@dataclasses.dataclass
class CompileReport:
    platform: str
    topology: str
    num_devices: int
    mesh: dict
    params_total: int
    params_non_embedding: int
    flops: dict
    compile_seconds: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    hbm_bytes: float | None = None
    error: str = ""
    required_bytes: float | None = None

    @property
    def per_device_bytes(self) -> int:
        """Live bytes at peak: arguments + outputs not aliased to (donated) arguments + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        if self.error:
            return False
        return self.hbm_bytes is None or self.per_device_bytes <= self.hbm_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_device_bytes"] = self.per_device_bytes
        d["fits"] = self.fits
        return d


def _parse_oom(message: str) -> tuple[float | None, float | None]:
    """(required, available) bytes from a TPU RESOURCE_EXHAUSTED message, when it names them."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def num(s):
        m = re.fullmatch(r"([\d.]+)\s*([KMGT])i?B?", s.strip())
        return float(m.group(1)) * units[m.group(2)] if m else None

    m = re.search(r"\(([\d.]+\s*[KMGT]i?B?)\) exceeds available HBM \(([\d.]+\s*[KMGT]i?B?)\)", message)
    if not m:
        m = re.search(r"Used ([\d.]+\s*[KMGT]i?B?) of ([\d.]+\s*[KMGT]i?B?) hbm", message)
    if not m:
        return None, None
    return num(m.group(1)), num(m.group(2))


def compile_train_step(config, devices: Sequence[Any] | None = None, *, num_slices: int = 1,
                       topology_name: str = "", hbm_bytes: float | None = None) -> CompileReport:
    """Lowers and compiles the config's train step for `devices` (default: the local ones)."""
    devices = list(devices) if devices is not None else jax.devices()
    run = build_run(config, devices, num_slices)
    mesh, model_cfg = run.mesh, run.model.config
    chunks = max(1, int(config.grad_cache_chunks))  # packed rows split evenly into chunks too
    global_shapes = global_batch_shapes(config, sharding.data_parallel_size(mesh) * chunks)
    abstract = run.abstract_state
    params_total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    non_embedding = params_total - embedding_param_count(model_cfg)
    flops = model_flops_per_step(model_cfg, non_embedding, sequence_shapes(global_shapes))

    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, len(v.shape)))
             for k, v in global_shapes.items()}
    for k, v in batch.items():
        if v.shape[0] % sharding.data_parallel_size(mesh):
            raise CompileOnlyError(
                f"batch entry {k} has {v.shape[0]} rows, not divisible by the data-parallel size "
                f"{sharding.data_parallel_size(mesh)} of mesh {dict(mesh.shape)}; change batch_size or mesh.shape")
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    state = abstract_state(abstract, run.state_shardings)
    report = CompileReport(
        platform=devices[0].platform, topology=topology_name or f"local {devices[0].platform}",
        num_devices=len(devices), mesh=dict(mesh.shape), params_total=params_total,
        params_non_embedding=non_embedding, flops=flops, compile_seconds=0.0, hbm_bytes=hbm_bytes)
    t0 = time.time()
    try:
        with jax.set_mesh(mesh):
            compiled = run.step.lower(state, batch, key).compile()
    except Exception as e:  # XLA reports out-of-memory as a runtime error at compile time
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.compile_seconds = time.time() - t0
        report.error = str(e).strip().splitlines()[0][:500]
        report.required_bytes, available = _parse_oom(str(e))
        if available:
            report.hbm_bytes = available
        return report
    report.compile_seconds = time.time() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = int(mem.argument_size_in_bytes)
        report.output_bytes = int(mem.output_size_in_bytes)
        report.alias_bytes = int(mem.alias_size_in_bytes)
        report.temp_bytes = int(mem.temp_size_in_bytes)
        report.code_bytes = int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    return report


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 8 else f"{n / 2**20:.1f} MiB"


def format_report(r: CompileReport, peak_flops: float | None = None) -> str:
    lines = [
        f"compile_only: {r.topology}, {r.num_devices} devices, mesh {r.mesh}",
        f"  parameters: {r.params_total:,} total, {r.params_non_embedding:,} non-embedding",
        f"  model FLOPs per step: {r.flops['total']:.4g} = 6 * {r.params_non_embedding:,} non-embedding params"
        f" * {r.flops['tokens']:,} tokens ({r.flops['dense']:.4g}) + attention {r.flops['attention']:.4g}"
        " (12 * attended query-key pairs * heads * head_dim, summed over layers)",
    ]
    if peak_flops:
        ideal = r.flops["total"] / (peak_flops * r.num_devices)
        lines.append(f"  ideal step time at 100% of peak bf16 ({peak_flops / 1e12:.0f} TFLOP/s per chip): {ideal * 1e3:.3g} ms")
    if r.error:
        lines.append(f"  DOES NOT FIT: {r.error}")
        lines.append(f"  required {_gib(r.required_bytes)} per device, available {_gib(r.hbm_bytes)}; "
                     "enable model.remat, raise grad_cache_chunks, shard more (mesh fsdp/tensor) or use a "
                     "bigger topology")
        return "\n".join(lines)
    lines += [
        f"  per device: arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)} "
        f"(aliased to donated arguments {_gib(r.alias_bytes)}), temporaries {_gib(r.temp_bytes)}, "
        f"code {_gib(r.code_bytes)}",
        f"  per device total {_gib(r.per_device_bytes)} of HBM {_gib(r.hbm_bytes)}"
        + ("" if r.hbm_bytes is None else f" ({100 * r.per_device_bytes / r.hbm_bytes:.1f}%)"),
        f"  compile time {r.compile_seconds:.1f} s",
    ]
    if not r.fits:
        lines.append(f"  DOES NOT FIT: needs {_gib(r.per_device_bytes)} per device but the chip has "
                     f"{_gib(r.hbm_bytes)}")
    return "\n".join(lines)


def compile_only(config, topology: str = "", num_slices: int = 1) -> int:
    """The `--compile_only` command: compile, print the report, return the exit code (0 = fits).

    Without `topology` a config that names its target (`config.topology`, the pod configs)
    compiles for that; one that does not compiles for the local devices.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Orbax logs every read/write step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not topology and config.get("topology"):
        topology = config.topology
        print(f"compile_only: no --topology given, compiling for the config's topology {topology} "
              "(pass --topology to choose another)")
    try:
        if topology:
            topo = parse_topology(topology, num_slices)
            devices = topology_devices(topo)
            report = compile_train_step(config, devices, num_slices=num_slices,
                                        topology_name=f"{topo.name} x{num_slices} slice(s)",
                                        hbm_bytes=topo.hbm_bytes)
            peak = PEAK_BF16_FLOPS[topo.generation]
        else:
            if num_slices != 1:
                raise CompileOnlyError("--num_slices needs --topology")
            try:
                report = compile_train_step(config)
            except sharding.ShardingError as e:
                raise CompileOnlyError(
                    f"{e} (compiling for the {len(jax.devices())} local {jax.devices()[0].platform} "
                    "devices; pass --topology, e.g. --topology v5e:4x4, to compile for a TPU slice)") from e
            peak = None
    except (CompileOnlyError, sharding.ShardingError) as e:
        print(f"compile_only: {e}")
        return 2
    print(format_report(report, peak))
    return 0 if report.fits else 1
