"""`import embedder` keeps big freed buffers in glibc's heap on CPU hosts (embedder/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from embedder import host_memory, xla_cpu_flags

# Allocates, frees and reallocates 400 MB from a worker thread (as XLA's threads do) and
# prints the minor page faults of the second allocation.
PROBE = """
import resource, threading
import embedder
import numpy as np
def work(out):
    a = np.ones(100_000_000, np.float32); del a
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(100_000_000, np.float32); a.sum()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
print(embedder._host_memory._applied, out[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
@pytest.mark.parametrize("opt_out", [None, "0"])
def test_freed_buffers_are_reused_without_page_faults(opt_out):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", xla_cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out is not None:
        env[xla_cpu_flags.OPT_OUT_ENV] = opt_out
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults = out.stdout.split()[-2:]
    pages = 400e6 / 4096
    if opt_out is None:
        assert applied == "True" and int(faults) < 0.05 * pages
    else:  # glibc maps a fresh chunk: every page faults again (huge pages would fault less)
        assert applied == "False" and int(faults) > 0.2 * pages / 512


@pytest.mark.parametrize("environ,want", [
    ({"JAX_PLATFORMS": "cpu"}, False), ({"JAX_PLATFORMS": "tpu"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, True), ({}, False),
])
def test_accelerator_present(environ, want, tmp_path):
    assert host_memory.accelerator_present(environ, dev=str(tmp_path)) is want
    (tmp_path / "nvidia0").touch()
    assert host_memory.accelerator_present({}, dev=str(tmp_path)) is True


def test_user_malloc_settings_win():
    assert host_memory.user_tunes_malloc({"MALLOC_ARENA_MAX": "4"})
    assert host_memory.user_tunes_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not host_memory.user_tunes_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"})
