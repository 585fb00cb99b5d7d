"""glibc malloc settings that keep XLA:CPU's big per-step buffers mapped from one step to the next.

XLA:CPU mallocs each execution's temporaries from its worker threads; glibc serves big ones with
a fresh `mmap`, so every step page-faults them in again. `apply()` sets one arena, no mmap'd
chunks and no trimming (`M_ARENA_MAX=1`, `M_MMAP_MAX=0`, unlimited `M_TRIM_THRESHOLD`), so freed
buffers stay in the heap for the next step; the cost: the process keeps its peak heap, and a
fragmented heap can grow past the live peak (bench/README.md, sessions 4 and 8). `import embedder`
calls it before JAX starts its threads, on Linux/glibc where JAX computes on the CPU; it leaves
malloc alone when the user tunes it (`MALLOC_*`, `glibc.malloc` in `GLIBC_TUNABLES`) or sets
`EMBEDDER_XLA_CPU_DEFAULTS=0`.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

from embedder.xla_cpu_flags import OPT_OUT_ENV

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8   # glibc <malloc.h>

_applied = False


def user_tunes_malloc(environ=os.environ) -> bool:
    return (any(k.startswith("MALLOC_") for k in environ)
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""))


def accelerator_present(environ=os.environ, dev: str = "/dev") -> bool:
    """Whether JAX will run on an accelerator: `JAX_PLATFORMS` names one first, or (unset) a
    GPU or TPU device file exists (NVIDIA, AMD KFD, TPU accel / VFIO)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return not platforms.startswith("cpu")
    patterns = ("nvidia[0-9]*", "kfd", "accel[0-9]*", "vfio/[0-9]*")
    return any(glob.glob(os.path.join(dev, p)) for p in patterns)


def apply() -> bool:
    """Sets the malloc options; True when they are (now or already) in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or user_tunes_malloc():
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if accelerator_present():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; an int -1 becomes SIZE_MAX: never trim the heap.
    _applied = all(libc.mallopt(param, value) == 1 for param, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _applied
