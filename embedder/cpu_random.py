"""Unrolled Threefry on CPU: dropout masks in one fused loop instead of five passes over memory.

JAX lowers its Threefry-2x32 hash (every `jax.random` draw with the default key, e.g. the
dropout masks of `nn.Dropout`) to a rolled `while` loop of 5 iterations on CPU, to keep
compile times short, and the unrolled form everywhere else. The loop keeps XLA from
fusing the hash into the op that uses the bits, so each dropout mask costs five read and
write passes over a uint32 array of its size. With the unrolled lowering the bits are
identical and are computed inside the consumer's fusion: dropping out a
[96, 12, 128, 128] attention-probability tensor takes 74 ms instead of 317 ms, and the
all-MiniLM-L6-v2 train step (64 packed triples, seq 64) 7.57 s instead of 8.19 s, with
2.29 GB of XLA temporaries instead of 2.93 (bench/README.md). Compiles take a little longer.

`apply()` registers JAX's own unrolled lowering for the CPU platform (a private JAX API:
when it is missing, nothing changes). `import embedder.model` calls it;
`EMBEDDER_XLA_CPU_DEFAULTS=0` opts out, as for `embedder.xla_cpu_flags`.
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
