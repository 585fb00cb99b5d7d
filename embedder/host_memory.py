"""glibc malloc settings that keep XLA:CPU's big per-step buffers mapped from one step to the next.

XLA:CPU allocates each execution's temporaries (2.3 GB for the all-MiniLM-L6-v2 train
step on 64 packed triples) with `malloc` from its worker threads and frees them at the end
of the step. glibc serves an allocation that size with a fresh `mmap` and returns it
with `munmap`, so every step page-faults all of it in again: 586,000 minor faults and
1.7 s of kernel time per step on a 2-core AMD EPYC. With one malloc arena, no mmap'd
chunks and no trimming, freed buffers stay in the heap and the next step reuses them:
no faults, and the step takes 6.5 s instead of 7.0 s (three alternating processes,
bench/README.md). The cost: the process keeps its peak heap instead of returning freed
memory to the system, and every thread allocates from one arena.

`apply()` sets `M_ARENA_MAX=1`, `M_MMAP_MAX=0` and an unlimited `M_TRIM_THRESHOLD` with
`mallopt`. `import embedder` calls it, before JAX starts its threads, on Linux with glibc
and only where JAX will compute on the CPU (`JAX_PLATFORMS` starting with cpu, or unset
with no GPU / TPU device file): on accelerator hosts the big buffers live on the device. It leaves malloc alone when the user already tunes it
(`MALLOC_*` variables or `glibc.malloc` in `GLIBC_TUNABLES`) or sets
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
