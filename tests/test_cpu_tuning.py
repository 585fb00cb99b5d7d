"""The CPU tuning is applied where the project owns the process and nowhere else: importing any
module of the package changes nothing process-wide, `embedder.tune_cpu()` touches no environment
variable, and every command of the project runs tuned without handing the tuning to its children."""

import os
import subprocess
import sys

import pytest

import embedder
from embedder import host_memory, xla_cpu_flags

# Every module of the package imported with os.environ's writes and ctypes' mallopt calls recorded
# when they come from code in the package (jax, sklearn and others set variables of their own).
IMPORT_PROBE = """
import ctypes, importlib, os, pkgutil, sys, traceback
PKG = os.path.join(os.path.dirname(os.path.abspath({pkg!r})), "")
writes = []
def ours():
    return [f.filename for f in traceback.extract_stack() if f.filename.startswith(PKG)]
def record(kind):
    def hook(*args):
        if ours():
            writes.append((kind, args[0]))
        return getattr(os, kind)(*args)
    return hook
os.environ.putenv, os.environ.unsetenv = record("putenv"), record("unsetenv")
class SpyCDLL(ctypes.CDLL):
    def __getattr__(self, name):
        if name == "mallopt" and ours():
            writes.append(("mallopt", ""))
        return super().__getattr__(name)
ctypes.CDLL = SpyCDLL
before = dict(os.environ)
import embedder
for m in pkgutil.walk_packages(embedder.__path__, "embedder."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from embedder import cpu_random, host_memory, xla_cpu_flags
import jax, jax.numpy as jnp
x = jnp.ones((256, 384)); w = jnp.ones((384, 1536))
text = jax.jit(lambda a, b: jax.nn.gelu(a @ b + 1.0)).lower(x, w).compile().as_text()
loops = jax.jit(lambda k: jax.random.bits(k, (3, 1000))).lower(jax.random.key(0)).compile().as_text().count(" while(")
print("WRITES", writes)
print("STATE", xla_cpu_flags._enabled, host_memory._applied, cpu_random._applied, "__ynn_fusion" in text, loops > 0)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", xla_cpu_flags.OPT_OUT_ENV, host_memory.RESTART_ENV)
           and not k.startswith("MALLOC_")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _lines(out, tag):
    return [line[len(tag) + 1:] for line in out.splitlines() if line.startswith(tag + " ")]


def test_importing_the_package_changes_nothing_process_wide():
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(pkg=embedder.__file__)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _lines(out.stdout, "WRITES") == ["[]"]   # no environment variable, no mallopt
    # Nothing switched on; XLA's own defaults (YNNPACK fusions, JAX's rolled Threefry loop) hold.
    assert _lines(out.stdout, "STATE") == ["False False False True True"]


def test_tune_cpu_sets_no_environment_variable_and_warns_once_jax_has_started():
    import jax

    jax.devices()   # the tests' backend is up by now
    before = dict(os.environ)
    with pytest.warns(RuntimeWarning, match="before the first JAX computation"):
        assert embedder.tune_cpu()
    assert dict(os.environ) == before


# A project command run as `python -m MODULE --help` (the tuning comes before argument parsing);
# at exit it reports its tuning and the environment a child process of its own would see.
CLI_PROBE = """
import atexit, os, runpy, subprocess, sys
def report():
    from embedder import cpu_random, host_memory, xla_cpu_flags
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('GLIBC_TUNABLES')), "
                            "repr(os.environ.get({marker!r})))"], capture_output=True, text=True).stdout.strip()
    print("TUNED", xla_cpu_flags._enabled, host_memory._applied, cpu_random._applied, host_memory._restarted,
          file=sys.__stdout__)
    print("CHILD", child, file=sys.__stdout__, flush=True)
atexit.register(report)
sys.argv = [{module!r}, "--help"]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
COMMANDS = ["embedder.train", "embedder.evaluate", "embedder.convert", "embedder.soup", "embedder.synth",
            "embedder.demo"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc options")
@pytest.mark.parametrize("module", COMMANDS)
def test_project_commands_run_tuned_and_their_children_get_the_users_environment(module):
    user_tunables = "glibc.rtld.optional_static_tls=512"   # a user's own, non-malloc tunable
    probe = CLI_PROBE.format(module=module, marker=host_memory.RESTART_ENV)
    out = subprocess.run([sys.executable, "-c", probe], env=_env(GLIBC_TUNABLES=user_tunables),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    flags, malloc, threefry, restarted = _lines(out.stdout, "TUNED")[-1].split()
    assert (flags, threefry) == ("True", "True")
    assert malloc == "True" or host_memory._glibc_version() is None
    # Only the train command restarts itself (with the malloc tunables, where the kernel gives huge pages).
    can_restart = host_memory.tunables_env(_env(GLIBC_TUNABLES=user_tunables)) is not None
    assert restarted == str(module == "embedder.train" and can_restart)
    assert _lines(out.stdout, "CHILD")[-1] == f"{user_tunables!r} None"


def test_opt_out_leaves_a_command_untuned():
    probe = CLI_PROBE.format(module="embedder.evaluate", marker=host_memory.RESTART_ENV)
    out = subprocess.run([sys.executable, "-c", probe], env=_env(**{xla_cpu_flags.OPT_OUT_ENV: "0"}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _lines(out.stdout, "TUNED")[-1] == "False False False False"
