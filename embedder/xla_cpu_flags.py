"""XLA:CPU options for the project's own executables (the Embedder forward, the train step) under the CPU tuning.

XLA:CPU hands dots and their neighbouring elementwise ops to YNNPACK fusions by default. For our
f32 encoder shapes its own dot emitter and loop fusions are faster, while a bf16 x bf16 -> f32 dot
needs YNNPACK to use a host's AMX / AVX512_BF16 units. `enable()` (part of `embedder.tune_cpu()`)
turns this on; `compiler_options(dtype, platform)` then gives one executable its setting through
`jax.jit(..., compiler_options=...)`: no YNNPACK fusions for f32, YNNPACK dots only for bf16 / f16.
Options are per executable rather than in `XLA_FLAGS`, so nothing reaches other computations of the
process or its child processes, and they apply whenever the backend started. Off when the user set
the flag in `XLA_FLAGS`, with jaxlib older than 0.8 (which does not know it), or with
`EMBEDDER_XLA_CPU_DEFAULTS=0`.
"""

from __future__ import annotations

import os

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG = "--" + YNN_OPTION
OPT_OUT_ENV = "EMBEDDER_XLA_CPU_DEFAULTS"
_MIN_JAXLIB = (0, 8)   # the option is known from here on; an unknown one is an error
NO_YNN_FUSIONS = {YNN_OPTION: ""}
YNN_DOTS = {YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}

_enabled = False       # whether enable() turned the options on in this process


def jaxlib_version() -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        raw = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in raw.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def user_sets_flag(xla_flags: str) -> bool:
    """Whether `xla_flags` (an `XLA_FLAGS` value) chooses the YNNPACK fusion types itself."""
    return any(f.split("=", 1)[0] == YNN_FLAG for f in xla_flags.split())


def wanted(environ=os.environ, version: tuple[int, ...] | None = None) -> bool:
    """Whether the options are ours to set: not opted out, a jaxlib that knows them, and no
    choice of the user's in `XLA_FLAGS`."""
    version = jaxlib_version() if version is None else version
    return (environ.get(OPT_OUT_ENV, "1") != "0" and version is not None and version >= _MIN_JAXLIB
            and not user_sets_flag(environ.get("XLA_FLAGS", "")))


def enable() -> bool:
    """Turns the per-executable options on where `wanted()`; True when they are on."""
    global _enabled
    _enabled = _enabled or wanted()
    return _enabled


def compiler_options(dtype, platform: str) -> dict:
    """Options (`jax.jit(..., compiler_options=...)`) for an executable whose compute dtype is `dtype`,
    compiled for `platform`: on the CPU, once enabled, no YNNPACK fusions for f32 and YNNPACK dots for
    bf16 / f16; nothing otherwise."""
    import jax.numpy as jnp

    if platform != "cpu" or not _enabled:
        return {}
    return dict(YNN_DOTS if jnp.dtype(dtype).itemsize < 4 else NO_YNN_FUSIONS)
