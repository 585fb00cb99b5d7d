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


def test_compiler_options_turn_ynnpack_dots_on_for_low_precision_cpu_executables(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "_ours", True)
    assert xla_cpu_flags.compiler_options("bfloat16", "cpu") == xla_cpu_flags.YNN_DOTS
    assert xla_cpu_flags.compiler_options("float16", "cpu") == xla_cpu_flags.YNN_DOTS
    assert xla_cpu_flags.compiler_options("float32", "cpu") == {}
    assert xla_cpu_flags.compiler_options("bfloat16", "tpu") == {}
    monkeypatch.setattr(xla_cpu_flags, "_ours", False)   # the user set the flag, or opted out
    assert xla_cpu_flags.compiler_options("bfloat16", "cpu") == {}


@pytest.mark.skipif(not xla_cpu_flags._ours, reason="YNNPACK flag set by the user")
def test_bf16_encoder_dots_run_in_ynnpack_as_bf16_x_bf16_to_f32():
    """A bf16 Embedder forward compiles its projections into YNNPACK dots of bf16 operands
    (AMX / AVX512_BF16 where the host has them); the f32 forward keeps XLA's own dots."""
    import re

    import jax
    import numpy as np

    from embedder.inference import _jitted_apply
    from embedder.model import ModelConfig

    from embedder.model import EmbeddingModel

    config = dict(family="gemma", vocab_size=64, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16, layer_types=("local", "global"), sliding_window=4,
                  projection_dims=(16,))
    ids, mask = np.ones((2, 8), np.int32), np.ones((2, 8), np.int32)
    texts = {}
    for dtype in ("bfloat16", "float32"):
        cfg = ModelConfig(**config, dtype=dtype)
        params = jax.eval_shape(lambda: EmbeddingModel(cfg).init(jax.random.key(0), ids, mask))["params"]
        texts[dtype] = _jitted_apply(cfg).lower(params, ids, mask).compile().as_text()
    # 7 projections a layer (q, k, v, o, gate, up, down), each a YNNPACK fusion of two bf16 operands.
    ynn_fusions = texts["bfloat16"].count('"kind":"__ynn_fusion"')
    bf16_operands = re.findall(r"%param_\d+(?:\.\d+)? = bf16\[", texts["bfloat16"])
    assert ynn_fusions >= 2 * 7 and len(bf16_operands) >= 2 * 2 * 7, (ynn_fusions, len(bf16_operands))
    assert "__ynn_fusion" not in texts["float32"]


OURS_PROBE = "import embedder; from embedder import xla_cpu_flags; print(xla_cpu_flags._ours)"


def test_a_child_process_knows_the_inherited_flag_is_ours_but_not_a_changed_one():
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", xla_cpu_flags.OPT_OUT_ENV, xla_cpu_flags.APPLIED_ENV)}
    env["JAX_PLATFORMS"] = "cpu"

    def ours(**extra):
        out = subprocess.run([sys.executable, "-c", OURS_PROBE], env=dict(env, **extra), capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1] == "True"

    assert ours()
    applied = {"XLA_FLAGS": f"{F}=", xla_cpu_flags.APPLIED_ENV: f"{F}="}   # what a parent exports
    assert ours(**applied)
    assert not ours(**dict(applied, XLA_FLAGS=f"{F}= {F}="))   # the user added the flag again
    assert not ours(XLA_FLAGS=f"{F}=")   # set by the user, no parent of ours
