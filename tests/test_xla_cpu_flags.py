"""`import embedder` turns XLA:CPU's YNNPACK fusions off unless the user chose otherwise; `import
embedder.model` lowers Threefry unrolled on CPU (same bits, fused dropout masks)."""

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


RANDOM_PROBE = """
import hashlib, jax, jax.numpy as jnp, numpy as np
from embedder import cpu_random
import embedder.model  # importing the model alone registers nothing
assert not cpu_random._applied
from embedder.train.config import base_config
from embedder.train.setup import build_run
build_run(base_config(), jax.devices()[:1])  # the run assembly registers it unless opted out
f = jax.jit(lambda k: jax.random.bits(k, (3, 1000), jnp.uint32))
loops = f.lower(jax.random.key(7)).compile().as_text().count(" while(")
print(hashlib.sha256(np.asarray(f(jax.random.key(7))).tobytes()).hexdigest()[:16], loops)
"""


def test_unrolled_threefry_gives_the_same_bits_without_a_loop():
    """Assembling a run (`build_run`, not importing the model) swaps JAX's rolled CPU Threefry loop
    for its unrolled lowering: the same bits (as JAX's own rolled lowering, under the opt-out), and
    no while loop left."""
    outs = {}
    for opt_out in (None, "0"):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu_flags.OPT_OUT_ENV)}
        env["JAX_PLATFORMS"] = "cpu"
        if opt_out is not None:
            env[xla_cpu_flags.OPT_OUT_ENV] = opt_out
        out = subprocess.run([sys.executable, "-c", RANDOM_PROBE], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs[opt_out] = out.stdout.split()[-2:]
    assert outs[None][0] == outs["0"][0]          # identical bits
    assert outs[None][1] == "0" and int(outs["0"][1]) >= 1  # unrolled vs JAX's rolled CPU loop
