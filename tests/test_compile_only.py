"""`--compile_only`: topology parsing, FLOPs formula, OOM parsing, abstract state, and real AOT compiles."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_script
from embedder import sharding
from embedder.train import compile_only as co

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("name,gen,dims", [("v5e:4x4", "v5e", (4, 4)), ("v5p:2x2x4", "v5p", (2, 2, 4)),
                                           ("v6e:8x8", "v6e", (8, 8)), ("v4:2x2x2", "v4", (2, 2, 2))])
def test_parse_topology(name, gen, dims):
    t = co.parse_topology(name, 2)
    assert (t.generation, t.dims, t.num_slices, t.chips_per_slice) == (gen, dims, 2, math.prod(dims))


@pytest.mark.parametrize("name,message", [("v5litepod-16", "not the accelerator-type name"),
                                          ("v5e:4x4x1", "v5e has 2 positive dimensions"),
                                          ("v5p:4x4", "v5p has 3 positive dimensions"),
                                          ("v7:2x2", "GENERATION:AxB")])
def test_parse_topology_errors(name, message):
    with pytest.raises(co.CompileOnlyError, match=message):
        co.parse_topology(name)


def test_parse_oom_message():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(20.90G) exceeds available HBM (15.75G).")
    req, avail = co._parse_oom(msg)
    assert req == pytest.approx(20.90 * 2**30) and avail == pytest.approx(15.75 * 2**30)
    req, avail = co._parse_oom("RESOURCE_EXHAUSTED: Used 17.5G of 15.75G hbm. Exceeded hbm capacity by 1.75G.")
    assert req == pytest.approx(17.5 * 2**30) and avail == pytest.approx(15.75 * 2**30)
    assert co._parse_oom("RESOURCE_EXHAUSTED: something else") == (None, None)


def test_report_fits_uses_live_bytes_with_donation():
    r = co.CompileReport(platform="tpu", topology="t", num_devices=4, mesh={}, params_total=0,
                         params_non_embedding=0, flops={}, compile_seconds=0.0, argument_bytes=10 * 2**30,
                         output_bytes=10 * 2**30, alias_bytes=10 * 2**30, temp_bytes=5 * 2**30,
                         hbm_bytes=15.75 * 2**30)
    assert r.per_device_bytes == 15 * 2**30 and r.fits
    r.temp_bytes = 6 * 2**30
    assert not r.fits
    r.hbm_bytes = None           # local CPU: no HBM limit
    assert r.fits


def _attention_flops_by_loops(layer_types, window, seqs, heads, head_dim):
    """Counts, query by query, the keys each query attends to; QK^T and AV are 2 MACs per (q, k, channel)."""
    total = 0
    for n, length in seqs:
        for t in layer_types:
            pairs = 0
            for i in range(length):
                for j in range(length):
                    if t == "global" or abs(i - j) < window:
                        pairs += 1
            total += n * pairs * heads * head_dim * 2 * 2 * 3    # 2 matmuls, 2 FLOPs per MAC, fwd + bwd
    return total


def test_flops_formula_against_loops():
    from embedder.model.config import get_model_config

    cfg = get_model_config("tiny")     # one local (window 4) and one global layer
    seqs = [(6, 12), (6, 10), (12, 9)]
    out = co.model_flops_per_step(cfg, 1000, seqs)
    tokens = 6 * 12 + 6 * 10 + 12 * 9
    assert out["tokens"] == tokens
    assert out["dense"] == 6 * 1000 * tokens
    assert out["attention"] == _attention_flops_by_loops(cfg.layer_types, cfg.sliding_window, seqs,
                                                         cfg.num_heads, cfg.head_dim)
    assert out["total"] == out["dense"] + out["attention"]


def _gemma_param_count(cfg) -> tuple[int, int]:
    """(total, embedding) parameters of a Gemma-family encoder + head, from the architecture."""
    h, nh, nkv, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * f + 2 * h   # q, k, v, o, mlp, 2 norms
    per_layer += h * (cfg.use_post_attn_norm + cfg.use_post_ffw_norm) + 2 * hd * cfg.use_qk_norm
    head, prev = 0, h
    for d in cfg.projection_dims:
        head += prev * d
        prev = d
    emb = cfg.vocab_size * h
    return emb + cfg.num_layers * per_layer + h + head, emb


def _tiny_config():
    from embedder.train.config import base_config

    c = base_config()
    c.batch_size = 8
    c.grad_cache_chunks = 2
    c.data.query_max_length = 8
    c.data.document_max_length = 8
    c.data.num_negatives = 1
    c.loss.dims = (32, 16)
    return c


def test_compile_for_local_cpu_devices(capsys):
    c = _tiny_config()
    r = co.compile_train_step(c)
    from embedder.model.config import ModelConfig

    total, emb = _gemma_param_count(ModelConfig.from_dict(c.model.to_dict()))
    assert (r.params_total, r.params_non_embedding) == (total, total - emb)
    assert r.num_devices == len(jax.devices()) and r.mesh["data"] == len(jax.devices())
    assert r.flops["tokens"] == 8 * 8 * 3          # query + positive + one negative per row
    assert r.argument_bytes > 0 and r.temp_bytes >= 0 and r.fits
    out = co.format_report(r)
    assert "local cpu, 8 devices" in out and "model FLOPs per step" in out


def test_compile_only_bad_mesh_is_a_clear_error(capsys):
    c = _tiny_config()
    c.mesh.shape = (3, -1, 1)
    assert co.compile_only(c) == 2
    out = capsys.readouterr().out
    assert "cannot auto-fill mesh axis" in out and "8 local cpu devices; pass --topology" in out


def _pod_config(name, stage="prefinetune"):
    return load_script(ROOT / "experiments" / f"{name}.py").get_config(stage)


@pytest.mark.parametrize("flag,want", [("", "v5e:4x4"), ("v5e:2x2", "v5e:2x2")])
def test_pod_config_compiles_for_its_own_topology_unless_told(monkeypatch, capsys, flag, want):
    asked = []

    def stop_at_devices(topo):   # the real devices need libtpu; the choice of topology is tested here
        asked.append(topo.name)
        raise co.CompileOnlyError(f"stopped before compiling for {topo.name}")

    monkeypatch.setattr(co, "topology_devices", stop_at_devices)
    assert co.compile_only(_pod_config("pod_gemma3_1b"), topology=flag) == 2
    out = capsys.readouterr().out
    assert asked == [want] and "cannot auto-fill" not in out, out
    assert ("compiling for the config's topology v5e:4x4 (pass --topology" in out) == (not flag), out


@needs_libtpu
def test_compile_tiny_config_for_v5e_2x2(capsys):
    c = _tiny_config()
    c.mesh.shape = (2, 2, 1)
    c.topology = "v5e:2x2"    # the target without --topology (an explicit one: the OOM test below)
    assert co.compile_only(c) == 0
    out = capsys.readouterr().out
    assert "v5e:2x2 x1 slice(s), 4 devices" in out and "of HBM 15.75 GiB" in out


@needs_libtpu
def test_tpu_compile_on_a_cpu_host_traces_the_tpu_graph(monkeypatch):
    """The model decides its dot layout from the compile target, not the host: the TPU program
    has none of the 2-D reshaped products (`einsum.CPU_2D_DOT`) that the same step has on CPU."""
    import dataclasses

    from embedder.model.einsum import CPU_2D_DOT

    texts = {}
    real_build_run = co.build_run

    def recording_build_run(*args, **kwargs):
        run = real_build_run(*args, **kwargs)

        class Recording:
            def lower(self, *a):
                lowered = run.step.lower(*a)
                texts[run.mesh.devices.flat[0].platform] = lowered.as_text(debug_info=True)
                return lowered
        return dataclasses.replace(run, step=Recording())

    monkeypatch.setattr(co, "build_run", recording_build_run)
    c = _tiny_config()
    c.grad_cache_chunks = 0
    c.mesh.shape = (2, 2, 1)
    assert co.compile_only(c, topology="v5e:2x2") == 0
    c.mesh.shape = (-1, 1, 1)
    assert co.compile_only(c) == 0
    assert CPU_2D_DOT in texts["cpu"] and CPU_2D_DOT not in texts["tpu"]
    assert texts["tpu"].count("dot_general") > 0


@needs_libtpu
def test_too_large_for_v5e_is_reported_not_crashed(capsys):
    # One global layer, no gradient cache (cheap to compile), but a 4M x 1024 embedding table
    # whose f32 Adam state (48 GiB, 24 GiB per chip over fsdp=2) cannot fit a 15.75 GiB v5e chip.
    c = _tiny_config()
    c.grad_cache_chunks = 0
    c.data.num_negatives = 0
    c.mesh.shape = (2, 2, 1)
    c.model.num_layers, c.model.layer_types = 1, ("global",)
    c.model.vocab_size, c.model.hidden_size = 1 << 22, 1024
    assert co.compile_only(c, topology="v5e:2x2") == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "15.75 GiB" in out


@needs_libtpu
def test_two_slice_mesh_puts_data_across_slices():
    topo = co.parse_topology("v5e:2x2", num_slices=2)
    devices = co.topology_devices(topo)
    assert sharding.slice_count(devices) == 2
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"), "shape": (2, -1, 1)}),
                              devices)   # the slice count the devices span
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # Each data index lives in one slice; the fsdp axis stays inside a slice (ICI).
    assert [set(slice_of[i].ravel()) for i in range(2)] == [{0}, {1}]
    with pytest.raises(sharding.ShardingError, match="multiple of the slice count"):
        sharding.make_mesh(ml_collections.ConfigDict({"axes": ("data", "fsdp", "tensor"), "shape": (1, -1, 1)}),
                           devices, num_slices=2)
