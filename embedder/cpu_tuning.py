"""The project's CPU tuning: `tune_cpu()` for a notebook or server, `tune_command()` for the project's own commands.

Three parts, each a no-op where it does not apply (an accelerator, another libc, an older jaxlib,
a user's own setting, `EMBEDDER_XLA_CPU_DEFAULTS=0`): per-executable XLA:CPU options for the
Embedder forward and the train step (`xla_cpu_flags`), glibc malloc settings (`host_memory`) and
JAX's unrolled Threefry lowering on the CPU (`cpu_random`). Importing `embedder` applies none of
them; nothing here writes to `os.environ`, so child processes start with glibc's and XLA's defaults.
"""

from __future__ import annotations

import sys
import warnings

from embedder import cpu_random, host_memory, xla_cpu_flags


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def tune_cpu() -> bool:
    """Applies the CPU tuning to this process; True when any part of it is in effect.

    Call it once, before the first JAX computation: malloc settings do not move memory that is
    already allocated, and functions compiled before the call keep their code (with a warning).
    It changes the process it runs in only: no environment variable is set.
    """
    if _backend_started():
        warnings.warn("embedder.tune_cpu(): JAX's backend has already started, so memory allocated and "
                      "functions compiled so far keep the defaults; call it before the first JAX computation",
                      RuntimeWarning, stacklevel=2)
    flags = xla_cpu_flags.enable()
    malloc = host_memory.apply()
    threefry = cpu_random.apply()
    return flags or malloc or threefry


def tune_command(restart: bool = False) -> bool:
    """`tune_cpu()` for a project command's main; with `restart`, first restarts the command once
    with the malloc policy as `GLIBC_TUNABLES` (huge pages for XLA:CPU's big buffers), which the
    restarted process removes from its environment again (`host_memory.reexec_with_tunables`)."""
    if restart:
        host_memory.reexec_with_tunables()
    return tune_cpu()
