"""Unrolled Threefry on CPU: dropout bits computed inside the op that uses them (same bits, faster).

JAX lowers Threefry-2x32 to a rolled 5-iteration `while` loop on CPU, which XLA cannot fuse into
the bits' consumer; `apply()` registers JAX's own unrolled lowering for CPU (a private JAX API:
when it is missing, nothing changes). Part of `embedder.tune_cpu()`; `EMBEDDER_XLA_CPU_DEFAULTS=0`
opts out.
"""

from __future__ import annotations

import os

from embedder.xla_cpu_flags import OPT_OUT_ENV

_applied = False


def apply() -> bool:
    """Registers the unrolled Threefry lowering on CPU; True when it is (now or already) in use."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        return False
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
    except ImportError:
        return False
    primitive = getattr(threefry2x32, "threefry2x32_p", None)
    unrolled = getattr(threefry2x32, "_threefry2x32_lowering_rule", None)
    if primitive is None or unrolled is None:
        return False
    mlir.register_lowering(primitive, unrolled, platform="cpu")
    _applied = True
    return True
