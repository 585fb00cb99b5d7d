"""glibc malloc policy on CPU hosts (embedder/host_memory.py): small freed buffers reused without
page faults, big ones given back (no heap growth from a carved block), huge pages after a restart."""

import os
import subprocess
import sys

import pytest

from embedder import host_memory, xla_cpu_flags

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")

# From a worker thread (as XLA's threads do): SMALL bytes freed and allocated again (minor faults
# of the second allocation); a BIG block, a small allocation after it, the block freed, a small
# allocation (which may carve the freed block), the block again (peak RSS growth over the run).
PROBE = """
import ctypes, resource, sys, threading
{prelude}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SMALL, BIG = 16 * 2**20, 400 * 2**20
def alloc(n):   # malloc and touch every page, as XLA:CPU does with its buffers
    p = libc.malloc(n); ctypes.memset(p, 1, n); return p
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
def work(out):
    libc.free(alloc(SMALL))
    before = faults(); libc.free(alloc(SMALL)); out.append(faults() - before)
    start = hwm()
    big = alloc(BIG); pinned = alloc(2**20); libc.free(big)
    carve = alloc(2**20)
    big = alloc(BIG)
    out.append((hwm() - start) / BIG)
    libc.free(big)
    before = faults(); libc.free(alloc(BIG)); out.append(faults() - before)
out = []
t = threading.Thread(target=work, args=(out,)); t.start(); t.join()
from embedder import host_memory
print(host_memory._applied, *out)
"""
SMALL_PAGES, BIG_PAGES = 16 * 2**20 / 4096, 400 * 2**20 / 4096


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", xla_cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _probe(env, prelude="import embedder; embedder.tune_cpu()"):
    out = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, small_faults, big_growth, big_faults = out.stdout.split()[-4:]
    return applied == "True", int(small_faults), float(big_growth), int(big_faults)


def test_small_buffers_reused_and_big_ones_never_double_the_heap():
    applied, small_faults, big_growth, _ = _probe(_clean_env())
    assert applied
    assert small_faults < 0.05 * SMALL_PAGES
    assert big_growth < 1.3


def test_the_probe_sees_the_carved_block_of_a_never_mmapping_heap():
    """A heap that never mmaps (one arena, no mmap, no trimming) grows by a second block."""
    env = _clean_env(MALLOC_ARENA_MAX="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40))
    applied, _, big_growth, _ = _probe(env)
    assert not applied and big_growth > 1.7


def test_opt_out_leaves_glibc_defaults():
    applied, *_ = _probe(_clean_env(**{xla_cpu_flags.OPT_OUT_ENV: "0"}))
    assert not applied


def test_restart_with_tunables_gives_big_blocks_huge_pages():
    env = _clean_env()
    if host_memory.tunables_env(env) is None:
        pytest.skip(f"no restart here: glibc {host_memory._glibc_version()}, transparent huge pages "
                    f"{host_memory.transparent_huge_pages()!r}")
    # The restarted process runs under the tunables but gives its environment back as the user set it.
    prelude = ("from embedder import host_memory; host_memory.reexec_with_tunables()\n"
               "import os; assert host_memory._restarted and 'GLIBC_TUNABLES' not in os.environ\n"
               "assert host_memory.RESTART_ENV not in os.environ")
    _, small_faults, big_growth, big_faults = _probe(env, prelude)
    assert small_faults < 0.05 * SMALL_PAGES and big_growth < 1.3
    assert big_faults < 0.05 * BIG_PAGES   # 2 MiB pages: a 512th of the 4 KiB faults


@pytest.mark.parametrize("environ,thp,want", [
    ({"JAX_PLATFORMS": "cpu"}, "madvise", True),
    ({"JAX_PLATFORMS": "cpu"}, "always", True),
    ({"JAX_PLATFORMS": "cpu"}, "never", False),
    ({"JAX_PLATFORMS": "cpu", xla_cpu_flags.OPT_OUT_ENV: "0"}, "madvise", False),
    ({"JAX_PLATFORMS": "cpu", "MALLOC_ARENA_MAX": "2"}, "madvise", False),
    ({"JAX_PLATFORMS": "tpu"}, "madvise", False),
])
def test_tunables_env_only_where_it_changes_something(environ, thp, want):
    if host_memory._glibc_version() is None or host_memory._glibc_version() < (2, 35):
        pytest.skip("glibc without glibc.malloc.hugetlb")
    env = host_memory.tunables_env(environ, thp_mode=thp)
    assert (env is not None) is want
    if want:
        assert env["GLIBC_TUNABLES"] == host_memory.TUNABLES and not host_memory.tunables_env(env, thp_mode=thp)
        kept = host_memory.tunables_env(dict(environ, GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX"), thp_mode=thp)
        assert kept["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX:" + host_memory.TUNABLES


def test_transparent_huge_pages_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_pages(str(f)) == "madvise"
    assert host_memory.transparent_huge_pages(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("environ,want", [
    ({"JAX_PLATFORMS": "cpu"}, False), ({"JAX_PLATFORMS": "tpu"}, True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, True), ({}, False),
])
def test_accelerator_present(environ, want, tmp_path):
    assert host_memory.accelerator_present(environ, dev=str(tmp_path)) is want
    (tmp_path / "nvidia0").touch()
    assert host_memory.accelerator_present({}, dev=str(tmp_path)) is True


def test_restart_marker_restores_the_users_tunables_and_ignores_a_stale_one():
    environ = {"GLIBC_TUNABLES": "glibc.rtld.nns=4:" + host_memory.TUNABLES,
               host_memory.RESTART_ENV: "=glibc.rtld.nns=4"}
    assert host_memory._restore_after_restart(environ)
    assert environ == {"GLIBC_TUNABLES": "glibc.rtld.nns=4"}
    environ = {"GLIBC_TUNABLES": host_memory.TUNABLES, host_memory.RESTART_ENV: "unset"}
    assert host_memory._restore_after_restart(environ) and environ == {}
    # A marker beside tunables a restart did not set (the user's own): dropped, the tunables kept.
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", host_memory.RESTART_ENV: "unset"}
    assert not host_memory._restore_after_restart(environ)
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


def test_user_malloc_settings_win():
    assert host_memory.user_tunes_malloc({"MALLOC_ARENA_MAX": "4"})
    assert host_memory.user_tunes_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not host_memory.user_tunes_malloc({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX"})
