"""The CPU tuning's XLA:CPU options (embedder/xla_cpu_flags.py): no YNNPACK fusions for our f32
executables, YNNPACK dots for bf16 ones, JAX's unrolled Threefry on CPU; none of it for other
computations, nor for the user's own choice."""

import os
import subprocess
import sys

import pytest

from embedder import xla_cpu_flags

F = xla_cpu_flags.YNN_FLAG

PROBE = """
import embedder, jax, jax.numpy as jnp
from embedder import xla_cpu_flags
embedder.tune_cpu()
x = jnp.ones((256, 384)); w = jnp.ones((384, 1536))
f = lambda a, b: jax.nn.gelu(a @ b + 1.0)
for opts in (xla_cpu_flags.compiler_options(jnp.float32, "cpu"), {}):
    text = jax.jit(f, compiler_options=opts).lower(x, w).compile().as_text()
    print("YNN" if "__ynn_fusion" in text else "NO_YNN")
"""


@pytest.mark.parametrize("environ,version,want", [
    ({}, (0, 10), True),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, (0, 10), True),
    ({"XLA_FLAGS": f"{F}=individual_dot --xla_foo=1"}, (0, 10), False),   # the user's choice
    ({"XLA_FLAGS": f"{F}="}, (0, 10), False),
    ({}, (0, 7), False),   # older jaxlib may not know the option
    ({xla_cpu_flags.OPT_OUT_ENV: "0"}, (0, 10), False),
])
def test_options_are_ours_only_without_a_choice_of_the_user(environ, version, want):
    assert xla_cpu_flags.wanted(environ, version) is want


@pytest.mark.parametrize("opt_out,want", [(None, ["NO_YNN", "YNN"]), ("0", ["YNN", "YNN"])])
def test_tuned_f32_executables_skip_ynnpack_and_other_computations_keep_xla_defaults(opt_out, want):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out is not None:
        env[xla_cpu_flags.OPT_OUT_ENV] = opt_out
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == want


RANDOM_PROBE = """
import hashlib, jax, jax.numpy as jnp, numpy as np
import embedder
from embedder import cpu_random
from embedder.train.config import base_config
from embedder.train.setup import build_run
build_run(base_config(), jax.devices()[:1])  # assembling a run registers nothing
assert not cpu_random._applied
embedder.tune_cpu()   # the tuning registers it unless opted out
f = jax.jit(lambda k: jax.random.bits(k, (3, 1000), jnp.uint32))
loops = f.lower(jax.random.key(7)).compile().as_text().count(" while(")
print(hashlib.sha256(np.asarray(f(jax.random.key(7))).tobytes()).hexdigest()[:16], loops)
"""


def test_unrolled_threefry_gives_the_same_bits_without_a_loop():
    """The CPU tuning (not importing the package, nor assembling a run) swaps JAX's rolled CPU
    Threefry loop for its unrolled lowering: the same bits (as JAX's own rolled lowering, under
    the opt-out), and no while loop left."""
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


def test_compiler_options_by_dtype_and_platform(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "_enabled", True)
    assert xla_cpu_flags.compiler_options("bfloat16", "cpu") == xla_cpu_flags.YNN_DOTS
    assert xla_cpu_flags.compiler_options("float16", "cpu") == xla_cpu_flags.YNN_DOTS
    assert xla_cpu_flags.compiler_options("float32", "cpu") == xla_cpu_flags.NO_YNN_FUSIONS
    assert xla_cpu_flags.compiler_options("bfloat16", "tpu") == {}
    monkeypatch.setattr(xla_cpu_flags, "_enabled", False)   # not tuned, the user set the flag, or opted out
    assert xla_cpu_flags.compiler_options("bfloat16", "cpu") == {}
    assert xla_cpu_flags.compiler_options("float32", "cpu") == {}


@pytest.mark.skipif(not xla_cpu_flags._enabled, reason="YNNPACK flag set by the user")
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
        texts[dtype] = _jitted_apply(cfg, "cpu").lower(params, ids, mask).compile().as_text()
    # 7 projections a layer (q, k, v, o, gate, up, down), each a YNNPACK fusion of two bf16 operands.
    ynn_fusions = texts["bfloat16"].count('"kind":"__ynn_fusion"')
    bf16_operands = re.findall(r"%param_\d+(?:\.\d+)? = bf16\[", texts["bfloat16"])
    assert ynn_fusions >= 2 * 7 and len(bf16_operands) >= 2 * 2 * 7, (ynn_fusions, len(bf16_operands))
    assert "__ynn_fusion" not in texts["float32"]


SAME_PROGRAM_PROBE = """
import hashlib, sys, jax, numpy as np
import embedder
from embedder import xla_cpu_flags
if sys.argv[1] == "env":   # the flag in XLA_FLAGS for the whole process, YNNPACK dots per bf16 executable
    xla_cpu_flags.compiler_options = lambda dtype, platform: (
        dict(xla_cpu_flags.YNN_DOTS) if jax.numpy.dtype(dtype).itemsize < 4 else {})
    from embedder import cpu_random
    cpu_random.apply()
else:
    embedder.tune_cpu()
from embedder.inference import _jitted_apply
from embedder.model import EmbeddingModel, ModelConfig
from embedder.train.config import base_config
from embedder.train.setup import build_run
try:
    from embedder.data.abstract_batch import global_batch_shapes
except ImportError:
    from embedder.data.batch_schema import global_batch_shapes
ids = np.ones((2, 8), np.int32)
out = []
for dtype in ("float32", "bfloat16"):
    cfg = ModelConfig(family="gemma", vocab_size=64, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, layer_types=("local", "global"), sliding_window=4,
                      projection_dims=(16,), dtype=dtype)
    params = jax.eval_shape(lambda: EmbeddingModel(cfg).init(jax.random.key(0), ids, ids))["params"]
    out.append(_jitted_apply(cfg, "cpu").lower(params, ids, ids).compile().as_text())
    c = base_config()
    c.model.dtype, c.batch_size, c.data.num_negatives = dtype, 4, 0
    c.data.query_max_length = c.data.document_max_length = 8
    run = build_run(c, jax.devices()[:1])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in global_batch_shapes(c, 1).items()}
    with jax.set_mesh(run.mesh):
        out.append(run.step.lower(run.abstract_state, batch, jax.random.key(0)).compile().as_text())
print(*(hashlib.sha256(t.encode()).hexdigest()[:16] for t in out))
"""


def test_per_executable_options_compile_the_program_the_process_wide_flag_did():
    """The tuning's per-executable options give the Embedder forward and the train step (f32 and
    bf16) the very program that `XLA_FLAGS` with the flag gave them: the same speed, without
    touching the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu_flags.OPT_OUT_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    hashes = {}
    for how, xla_flags in (("env", f"{F}="), ("tuned", "")):
        out = subprocess.run([sys.executable, "-c", SAME_PROGRAM_PROBE, how], env=dict(env, XLA_FLAGS=xla_flags),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        hashes[how] = out.stdout.split()[-4:]
    assert hashes["env"] == hashes["tuned"]
