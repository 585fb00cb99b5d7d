"""XLA:CPU defaults that make our encoders faster on CPU hosts; set before JAX opens a backend.

XLA:CPU (jaxlib 0.10) hands dots and their neighbouring elementwise ops to YNNPACK fusions by
default. For our transformer shapes (e.g. [8192, 384] x [384, 1536]) its own dot emitter plus
XLA's loop fusions are faster: the all-MiniLM-L6-v2 forward (64 x 128 tokens) takes 1.89 s
instead of 2.30 s on a 2-core AMD EPYC (bench/README.md), with results equal to float rounding.
The train step is unchanged (9.2 s either way), accelerators are unaffected (the flag only
concerns the CPU client).

`apply()` appends `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) to
`XLA_FLAGS` unless the user already chose a value for that flag, or `EMBEDDER_XLA_CPU_DEFAULTS=0`.
XLA reads `XLA_FLAGS` once, when the first backend starts: in a process that already ran a JAX
computation it changes nothing. `import embedder` calls it.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT_ENV = "EMBEDDER_XLA_CPU_DEFAULTS"
_MIN_JAXLIB = (0, 8)   # the flag is known from here on; an unknown flag aborts XLA


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
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return
    os.environ["XLA_FLAGS"] = flags_with_defaults(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())
