"""`import embedder` turns XLA:CPU's YNNPACK fusions off unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

from embedder import xla_cpu_flags

F = xla_cpu_flags.YNN_FLAG

PROBE = """
import embedder, jax, jax.numpy as jnp
x = jnp.ones((256, 384)); w = jnp.ones((384, 1536))
text = jax.jit(lambda a, b: jax.nn.gelu(a @ b + 1.0)).lower(x, w).compile().as_text()
print("YNN" if "__ynn_fusion" in text else "NO_YNN")
"""


@pytest.mark.parametrize("given,version,want", [
    ("", (0, 10), f"{F}="),
    ("--xla_force_host_platform_device_count=8", (0, 10), f"--xla_force_host_platform_device_count=8 {F}="),
    (f"{F}=individual_dot --xla_foo=1", (0, 10), f"{F}=individual_dot --xla_foo=1"),   # the user's choice
    (f"{F}=", (0, 10), f"{F}="),
    ("--xla_foo=1", (0, 7), "--xla_foo=1"),   # older jaxlib may not know the flag: leave it
    ("--xla_foo=1", None, "--xla_foo=1"),
])
def test_flags_with_defaults(given, version, want):
    assert xla_cpu_flags.flags_with_defaults(given, version) == want


@pytest.mark.parametrize("opt_out,want", [(None, "NO_YNN"), ("0", "YNN")])
def test_import_embedder_sets_the_flag_before_jax_compiles(opt_out, want):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out is not None:
        env[xla_cpu_flags.OPT_OUT_ENV] = opt_out
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == want
