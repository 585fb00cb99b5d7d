"""XLA:CPU defaults that make our encoders faster on CPU hosts; set before JAX opens a backend.

XLA:CPU hands dots and their neighbouring elementwise ops to YNNPACK fusions by default; for our
f32 transformer shapes its own dot emitter plus loop fusions are faster (bench/README.md,
session 3), while bf16 x bf16 -> f32 dots need YNNPACK to use a host's AMX / AVX512_BF16 units
(session 9). `apply()` appends `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) to
`XLA_FLAGS`; `compiler_options(dtype, platform)` turns YNNPACK dots back on for one executable
whose compute dtype is bf16 or f16. Neither acts when the user chose a value for that flag, or
with `EMBEDDER_XLA_CPU_DEFAULTS=0`. XLA reads `XLA_FLAGS` once, when the first backend starts;
`import embedder` calls `apply()`.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT_ENV = "EMBEDDER_XLA_CPU_DEFAULTS"
_MIN_JAXLIB = (0, 8)   # the flag is known from here on; an unknown flag aborts XLA
YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# XLA_FLAGS as apply() left it, so a child process that inherits them knows the flag is ours.
APPLIED_ENV = "EMBEDDER_XLA_FLAGS_APPLIED"
_ours = False          # whether apply() set the flag (not the user)


def _jaxlib_version() -> tuple[int, ...] | None:
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


def flags_with_defaults(xla_flags: str, jaxlib_version: tuple[int, ...] | None) -> str:
    """`xla_flags` plus our CPU defaults (unchanged when the user set the flag or jaxlib is older)."""
    if jaxlib_version is None or jaxlib_version < _MIN_JAXLIB:
        return xla_flags
    if any(f.split("=", 1)[0] == YNN_FLAG for f in xla_flags.split()):
        return xla_flags
    return f"{xla_flags} {YNN_FLAG}=".strip()


def apply() -> None:
    global _ours
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return
    before = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = flags_with_defaults(before, _jaxlib_version())
    _ours = _ours or os.environ["XLA_FLAGS"] != before or os.environ.get(APPLIED_ENV) == before
    if _ours:
        os.environ[APPLIED_ENV] = os.environ["XLA_FLAGS"]


def compiler_options(dtype, platform: str) -> dict:
    """Per-executable XLA options (`jax.jit(..., compiler_options=...)`) for a computation in
    compute `dtype` on `platform`: YNNPACK dots for bf16 / f16 on the CPU, where apply() turned
    YNNPACK off; nothing otherwise."""
    import jax.numpy as jnp

    if platform != "cpu" or not _ours or jnp.dtype(dtype).itemsize >= 4:
        return {}
    return dict(YNN_DOTS)
