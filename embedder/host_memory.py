"""glibc malloc settings for XLA:CPU: small buffers reused between steps, big ones given back when freed.

One arena, no trimming, and a fixed 32 MiB mmap threshold (glibc's largest). Buffers below it are
reused from the heap without page faults; bigger ones, such as XLA:CPU's one temporary block per
step, get their own mapping, so no small allocation can carve a freed block and make the next
step's block grow the heap. Their page faults are cheap with transparent huge pages, which glibc
asks for only when started with `glibc.malloc.hugetlb=1` in `GLIBC_TUNABLES`:
`reexec_with_tunables()` restarts a command with the policy as tunables (the train CLI and the
benchmarks call it first) and, in the restarted process, gives the environment back as the user
set it, so child processes never see the tunables; `apply()` sets what `mallopt` can in a running
process (`embedder.tune_cpu()` calls it). Neither acts where JAX runs on an accelerator, off
Linux/glibc, when the user tunes malloc (`MALLOC_*`, `glibc.malloc` in `GLIBC_TUNABLES`), or with
`EMBEDDER_XLA_CPU_DEFAULTS=0`.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

from embedder.xla_cpu_flags import OPT_OUT_ENV

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8   # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20      # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 2**62           # never give the heap's top back
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
TUNABLES = (f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:"
            f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}:glibc.malloc.hugetlb=1")

# Set by reexec_with_tunables() for the restarted process only: the user's GLIBC_TUNABLES
# ("=" + value, or "unset"), restored and removed first thing there.
RESTART_ENV = "EMBEDDER_GLIBC_TUNABLES_BEFORE_RESTART"

_applied = False
_restarted = False     # whether this process runs under the tunables reexec_with_tunables() set


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


def _glibc_version() -> tuple[int, ...] | None:
    if not sys.platform.startswith("linux"):
        return None
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    return tuple(int(x) for x in version.split(".")[:2] if x.isdigit())


def _ours_to_set(environ) -> bool:
    return (environ.get(OPT_OUT_ENV, "1") != "0" and not user_tunes_malloc(environ)
            and _glibc_version() is not None and not accelerator_present(environ))


def apply() -> bool:
    """Sets the malloc options with `mallopt`; True when they are (now or already) in effect."""
    global _applied
    if _applied:
        return True
    if not _ours_to_set(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; -1 as the trim threshold becomes SIZE_MAX: never trim.
    _applied = all(libc.mallopt(param, value) == 1 for param, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, -1)))
    return _applied


def transparent_huge_pages(path: str = THP_ENABLED) -> str:
    """The kernel's THP mode (`always`, `madvise` or `never`; empty where unknown)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def tunables_env(environ=os.environ, thp_mode: str | None = None) -> dict | None:
    """`environ` with the policy as `GLIBC_TUNABLES` (huge pages included), or None where a
    restart would not change anything: the policy is not ours to set, glibc predates
    `glibc.malloc.hugetlb` (2.35), or the kernel never gives huge pages."""
    if not _ours_to_set(environ) or (_glibc_version() or (0,)) < (2, 35):
        return None
    if (thp_mode if thp_mode is not None else transparent_huge_pages()) not in ("always", "madvise"):
        return None
    existing = environ.get("GLIBC_TUNABLES", "")
    return dict(environ, GLIBC_TUNABLES=f"{existing}:{TUNABLES}" if existing else TUNABLES)


def _restore_after_restart(environ) -> bool:
    """In a process that `reexec_with_tunables()` started: puts the user's `GLIBC_TUNABLES` back
    into `environ` (glibc read the tunables at start-up) and drops the marker; True there. A marker
    whose tunables are not the ones a restart sets (an odd inheritance) is dropped and ignored."""
    marker = environ.pop(RESTART_ENV, None)
    if marker is None:
        return False
    before = None if marker == "unset" else marker[1:]
    if environ.get("GLIBC_TUNABLES") != (f"{before}:{TUNABLES}" if before else TUNABLES):
        return False
    if before is None:
        environ.pop("GLIBC_TUNABLES", None)
    else:
        environ["GLIBC_TUNABLES"] = before
    return True


def reexec_with_tunables() -> None:
    """Restarts this command (same pid and argv) with `tunables_env()`; returns when there is
    nothing to change, and in the restarted process, whose environment it first gives back as
    the user set it. Call it first thing in a command's main, never in a library or notebook."""
    global _restarted
    if _restore_after_restart(os.environ):
        _restarted = True
        return
    env = tunables_env()
    if env is None or not getattr(sys, "orig_argv", None):
        return
    env[RESTART_ENV] = "=" + os.environ["GLIBC_TUNABLES"] if "GLIBC_TUNABLES" in os.environ else "unset"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
