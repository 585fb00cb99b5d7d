"""Quantisation: int4 packing, the QAT forward against a NumPy fake quantisation, straight-through
gradients, the QAT lookup's gathered rows against the whole quantised table, PTQ closeness,
quantised exports through the model store, the int8 encode path and a QAT step through the
gradient cache."""
import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import checkpoint, sharding
from embedder.inference import Embedder
from embedder.model import EmbeddingModel
from embedder.model.config import get_model_config
from embedder.model.einsum import int8_einsum
from embedder.model.quant import pack_int4, straight_through, unpack_int4

SCHEMES = ("int8", "int4", "mixed")
SP = "debian_sp8k.model"
TEXTS = ["how do I resize a partition", "a tool to edit PDF files", "network time daemon",
         "fonts for mathematics typesetting", "library for reading JPEG images"]


def init_params(cfg, seed=0):
    model = EmbeddingModel(cfg)
    ids = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(seed), ids, ids)["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(params))


def numpy_fake_quantize(params, scheme, block=32):
    """An independent NumPy fake quantisation of a params tree by the documented rules: kernels
    (`.../w`) scale over their input axes (two for attention `o`), embedding tables over their
    width; symmetric absmax to 127 (int8, per channel) or 7 (int4, per `block` input features);
    `mixed` is int8 under `attention/`, int4 elsewhere."""
    def fq(w, contracted, bits, blk):
        qmax = 2 ** (bits - 1) - 1
        kept = [a for a in range(w.ndim) if a not in contracted]
        m = np.transpose(w, kept + list(contracted)).astype(np.float64)
        k = math.prod(w.shape[a] for a in contracted)
        blk = blk if blk and k % blk == 0 and k > blk else k
        rows = m.reshape(-1, k // blk, blk)
        out = np.empty_like(rows)
        for i in range(rows.shape[0]):
            for j in range(rows.shape[1]):
                s = np.float32(np.abs(rows[i, j]).max()) / np.float32(qmax)
                s = np.float32(s) if s > 0 else np.float32(1)
                out[i, j] = np.clip(np.round(rows[i, j].astype(np.float32) / s), -qmax, qmax) * s
        return np.transpose(out.reshape(m.shape), np.argsort(kept + list(contracted))).astype(w.dtype)

    def walk(node, path):
        out = {}
        for name, v in node.items():
            p = f"{path}/{name}" if path else name
            if isinstance(v, dict):
                out[name] = walk(v, p)
                continue
            if name in ("embedding", "word_embedding"):
                contracted = (v.ndim - 1,)
            elif name == "w":
                contracted = (0, 1) if p.split("/")[-2] == "o" else (0,)
            else:
                out[name] = v
                continue
            int8 = scheme == "int8" or (scheme == "mixed" and "/attention/" in f"/{p}")
            out[name] = fq(v, contracted, 8 if int8 else 4, 0 if int8 else block)
        return out

    return walk(params, "")


def test_int4_packing_round_trips_every_value():
    rng = np.random.default_rng(0)
    for shape in [(16,), (3, 5, 7), (1,), (2, 33)]:
        q = rng.integers(-8, 8, shape).astype(np.int8)
        packed = pack_int4(q)
        assert packed.dtype == np.uint8 and packed.size == (q.size + 1) // 2
        np.testing.assert_array_equal(unpack_int4(packed, shape), q)
    every = np.arange(-8, 8, dtype=np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(every), every.shape), every)
    assert pack_int4(np.array([1, -1], np.int8))[0] == 0xF1   # low nibble first
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([9], np.int8))


@pytest.mark.parametrize("family", ["tiny", "tiny-bert"])
def test_qat_forward_equals_numpy_fake_quantised_forward(family):
    cfg = get_model_config(family)
    params = init_params(cfg)
    ids = np.random.default_rng(1).integers(1, 200, (3, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    plain = EmbeddingModel(cfg)
    for scheme in SCHEMES:
        qat = EmbeddingModel(cfg.replace(quant_scheme=scheme, quant_block=16))
        got = qat.apply({"params": params}, ids, mask)
        want = plain.apply({"params": numpy_fake_quantize(params, scheme, 16)}, ids, mask)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=scheme)
        # Not vacuous: quantisation moved the output.
        assert np.max(np.abs(np.asarray(got) - np.asarray(plain.apply({"params": params}, ids, mask)))) > 1e-4


def test_qat_scanned_layers_equal_unrolled():
    from embedder.model.layer_stack import stack_layers

    cfg = get_model_config("tiny", quant_scheme="mixed", quant_block=16)
    params = init_params(cfg.replace(quant_scheme=""))
    ids = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    mask = np.ones_like(ids)
    unrolled = EmbeddingModel(cfg).apply({"params": params}, ids, mask)
    scanned_cfg = cfg.replace(scan_layers=True)
    scanned = EmbeddingModel(scanned_cfg).apply({"params": stack_layers(params, scanned_cfg)}, ids, mask)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=1e-5)


def test_gradients_pass_straight_through():
    w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)
    key = (("axes", (0,)), ("bits", 4), ("block", 0))
    c = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)), jnp.float32)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(c * straight_through(v, key)))(w), c)
    # Through the model: the QAT gradient is the float model's gradient at the quantised weights.
    cfg = get_model_config("tiny")
    params = init_params(cfg)
    ids = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    mask = np.ones_like(ids)
    qat = EmbeddingModel(cfg.replace(quant_scheme="int4", quant_block=16))
    g_qat = jax.grad(lambda p: jnp.sum(qat.apply({"params": p}, ids, mask) ** 2))(params)
    plain = EmbeddingModel(cfg)
    g_ref = jax.grad(lambda p: jnp.sum(plain.apply({"params": p}, ids, mask) ** 2))(
        numpy_fake_quantize(params, "int4", 16))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_qat), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("family", ["tiny", "tiny-bert"])
def test_qat_table_rows_equal_whole_table_quantisation(family):
    """The QAT lookup quantises only the gathered rows of the token table: per scheme, the same
    forward and the same gradients (the table's included, repeated tokens summed) as the whole
    params tree fake-quantised in JAX ahead of the float model, and as the float model at the
    NumPy fake-quantised params (straight through: the float gradient at the quantised point)."""
    from embedder.model.quant import fake_quantize_params

    cfg = get_model_config(family)
    params = init_params(cfg)
    ids = np.random.default_rng(4).integers(1, 40, (3, 8)).astype(np.int32)   # tokens repeat
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    table = "embedding" if family == "tiny" else "word_embedding"
    plain = EmbeddingModel(cfg)
    loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, ids, mask)))
    for scheme in SCHEMES:
        qat = EmbeddingModel(cfg.replace(quant_scheme=scheme, quant_block=16))
        whole = lambda p: jnp.sum(jnp.sin(plain.apply({"params": fake_quantize_params(p, scheme, 16)}, ids, mask)))
        got, g_got = jax.value_and_grad(loss(qat))(params)
        old, g_old = jax.value_and_grad(whole)(params)
        ref, g_ref = jax.value_and_grad(loss(plain))(numpy_fake_quantize(params, scheme, 16))
        np.testing.assert_allclose(got, old, rtol=1e-6, err_msg=scheme)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5, err_msg=scheme)
        g_table = np.asarray(g_got["encoder"][table])
        assert np.count_nonzero(np.any(g_table != 0, axis=1)) == len(np.unique(ids[mask == 1])), scheme
        np.testing.assert_allclose(g_table, g_old["encoder"][table], atol=1e-6, rtol=1e-5, err_msg=scheme)
        np.testing.assert_allclose(g_table, g_ref["encoder"][table], atol=1e-5, rtol=1e-4, err_msg=scheme)
        for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_old),
                                   jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=f"{scheme} {jax.tree_util.keystr(path)}")
            np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4, err_msg=f"{scheme} {jax.tree_util.keystr(path)}")


def _outputs(jaxpr):
    """Every equation output of `jaxpr`, its sub-jaxprs' included (calls, custom VJPs, scans)."""
    for eqn in jaxpr.eqns:
        yield from eqn.outvars
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _outputs(sub)


@pytest.mark.parametrize("family", ["tiny", "tiny-bert"])
def test_qat_forward_makes_no_table_sized_array(family):
    """A big vocabulary and a small width: the QAT forward's traced program makes no array as large
    as the token table (the table is a parameter; only its gathered rows are fake-quantised)."""
    cfg = get_model_config(family, vocab_size=1 << 16)
    params = init_params(cfg)
    ids = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    mask = np.ones_like(ids)
    table = params["encoder"]["embedding" if family == "tiny" else "word_embedding"]
    for scheme in SCHEMES:
        qat = EmbeddingModel(cfg.replace(quant_scheme=scheme, quant_block=16))
        jaxpr = jax.make_jaxpr(lambda p: qat.apply({"params": p}, ids, mask))(params).jaxpr
        assert any(v.aval.shape == table.shape for v in jaxpr.invars)
        sizes = [math.prod(v.aval.shape) for v in _outputs(jaxpr) if hasattr(v.aval, "shape")]
        assert sizes and max(sizes) < table.size // 8, scheme


def _spec(cfg):
    return {"model": cfg.to_dict(), "tokenizer": {"kind": "sentencepiece", "file": SP, "max_length": 32},
            "prompts": {"query": "task: {task} | query: {text}", "document": "title: {title} | text: {text}"}}


@pytest.fixture(scope="module")
def float_export(tmp_path_factory, repo_root):
    cfg = get_model_config("tiny", vocab_size=8192)
    params = init_params(cfg, seed=4)
    spec = _spec(cfg)
    spec["tokenizer"]["file"] = str(repo_root / "embedder" / "assets" / SP)
    return checkpoint.save_params(tmp_path_factory.mktemp("f32") / "export", params, spec), params


def _cosines(a, b):
    return np.sum(a * b, axis=1)   # rows are unit vectors


def test_quantised_export_round_trips_through_embedder_load(float_export, tmp_path):
    from embedder import model_store
    from embedder.quantize import ptq_params, quantize_model

    src, params = float_export
    f32 = Embedder.load(src)
    reference = f32.encode(TEXTS)
    sizes = {}
    for scheme in SCHEMES:
        report = quantize_model(src, tmp_path / scheme, scheme=scheme, block=16)
        sizes[scheme] = report["bytes_stored"]
        assert report["bytes_on_disk"] < report["bytes_float"] * 0.3, scheme
        loaded = Embedder.load(tmp_path / scheme)
        assert "quantization" not in loaded.spec and loaded.config.quant_scheme == ""
        in_memory = Embedder(ptq_params(params, scheme, 16), f32.spec)
        np.testing.assert_allclose(loaded.encode(TEXTS), in_memory.encode(TEXTS), atol=1e-6)
        # The store shows the float model it loads as, without reading arrays.
        meta = model_store.param_metadata(tmp_path / scheme)
        assert meta["encoder/embedding"] == ((8192, 64), np.dtype("float32"))
        assert _cosines(loaded.encode(TEXTS), reference).min() > (0.999 if scheme == "int8" else 0.9), scheme
    spec = json.loads((tmp_path / "int4" / "model.json").read_text())
    assert spec["quantization"]["leaves"]["encoder/embedding"] == {
        "bits": 4, "block": 16, "axes": [1], "shape": [8192, 64]}
    # int8 ~ 1/4 and int4 ~ 1/8 of float32, plus scales and the float leaves (before the
    # checkpoint's compression, whose ratio depends on the values).
    assert report["bytes_float"] * 0.2 < sizes["int8"] < report["bytes_float"] * 0.3
    assert sizes["int4"] < sizes["mixed"] < sizes["int8"]
    assert sizes["int4"] < report["bytes_float"] * 0.2


def test_ptq_int8_stays_close_to_float(float_export):
    from embedder.quantize import ptq_params

    _, params = float_export
    cfg = get_model_config("tiny", vocab_size=8192)
    spec = _spec(cfg)
    spec["tokenizer"]["file"] = str(float_export[0] / SP)
    base = Embedder(params, spec).encode(TEXTS, dim=32)
    int8 = Embedder(ptq_params(params, "int8"), spec).encode(TEXTS, dim=32)
    assert _cosines(base, int8).min() > 0.999


def test_soup_and_to_hf_read_a_quantised_export_dequantised(float_export, tmp_path):
    from embedder import soup
    from embedder.convert.to_hf import convert_to_hf
    from embedder.quantize import quantize_model

    src, _ = float_export
    quantize_model(src, tmp_path / "q", scheme="int8")
    q = Embedder.load(tmp_path / "q")
    params, spec, report = soup.make_soup([tmp_path / "q", tmp_path / "q"], method="uniform")
    souped = Embedder.load(soup.write_soup(tmp_path / "soup", params, spec, report))
    assert "quantization" not in json.loads((tmp_path / "soup" / "model.json").read_text())
    np.testing.assert_allclose(souped.encode(TEXTS), q.encode(TEXTS), atol=1e-6)
    hf = convert_to_hf(tmp_path / "q", tmp_path / "hf")
    np.testing.assert_allclose(Embedder.load(hf).encode(TEXTS), q.encode(TEXTS), atol=1e-5)


def test_int8_einsum_is_integer_arithmetic():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    q = rng.integers(-127, 128, (8, 2, 4)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (2, 4, 1)).astype(np.float32)
    rows = x.reshape(6, 8)
    xs = np.abs(rows).max(1, keepdims=True) / np.float32(127)
    xq = np.clip(np.round(rows / xs), -127, 127).astype(np.int64)
    want = (xq @ q.reshape(8, 8).astype(np.int64)).astype(np.float32) * xs * scale.reshape(1, -1)
    got = jax.jit(lambda a: int8_einsum("BLD,DNH->BLNH", a, q, scale))(x)
    np.testing.assert_allclose(got, want.reshape(2, 3, 2, 4), rtol=1e-6)
    assert "i32" in jax.jit(lambda a: int8_einsum("BLD,DNH->BLNH", a, q, scale)).lower(x).as_text()


def test_int8_encode_is_close_to_float(float_export):
    src, _ = float_export
    base = Embedder.load(src).encode(TEXTS)
    int8 = Embedder.load(src, quantized_compute="int8")
    assert int8.config.scan_layers is False
    assert _cosines(base, int8.encode(TEXTS)).min() > 0.99
    with pytest.raises(ValueError, match="quantized_compute"):
        Embedder.load(src, quantized_compute="int4")


def test_qat_step_through_gradient_cache_equals_full_batch():
    """The QAT model (the config switch `model.quant_scheme`) through the gradient cache: the same
    loss and gradients as the full batch, on a data-parallel mesh."""
    from embedder.train.config import base_config
    from embedder.train.step import make_grad_fn
    from test_train_step import LOSS, make_batch, mesh_of

    assert base_config().model.quant_scheme == ""   # the switch: --config.model.quant_scheme=int4
    cfg = get_model_config("tiny", quant_scheme="mixed", quant_block=16)
    model = EmbeddingModel(cfg)
    batch = make_batch(0, b=8, k=1)
    mesh = mesh_of((2, 1, 1), jax.devices()[:2])
    params = init_params(cfg.replace(quant_scheme=""))
    out = {}
    for chunks in (0, 2):
        grad_fn = make_grad_fn(model, LOSS, grad_cache_chunks=chunks)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            (loss, _), grads = jax.jit(grad_fn)(params, sharding.host_to_global(batch, mesh), jax.random.key(1))
        out[chunks] = float(loss), jax.tree.map(np.asarray, grads)
    assert out[2][0] == pytest.approx(out[0][0], rel=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(out[0][1]))
    assert scale > 1e-3
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[2][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_quantize_cli_errors_are_one_line(float_export, tmp_path):
    src, _ = float_export
    run = lambda *a: subprocess.run([sys.executable, "-m", "embedder.quantize", *map(str, a)],
                                    capture_output=True, text=True)
    bad = run(src, tmp_path / "x", "--scheme", "int3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    none = run(src, tmp_path / "y")
    assert none.returncode == 1 and "--scheme" in none.stderr and len(none.stderr.strip().splitlines()) == 1


def test_quantize_table_driver_plumbing(tmp_path, repo_root):
    """experiments/quantize_table.py on a tiny model: PTQ and one QAT row (1 step), a tiny task."""
    import gzip

    import runpy

    from conftest import write_debian_pairs
    from experiments.quantize_table import build_table, markdown

    pairs = write_debian_pairs(tmp_path / "pairs.jsonl", 64)
    tiny_config = repo_root / "tests" / "configs" / "tiny.py"
    config = runpy.run_path(str(tiny_config))["get_config"](str(pairs))
    cfg = get_model_config("tiny", **{k: v for k, v in config.model.to_dict().items()
                                      if k in ("projection_dims", "mrl_dims")})
    spec = _spec(cfg)
    spec["tokenizer"]["file"] = str(repo_root / "embedder" / "assets" / SP)
    model = checkpoint.save_params(tmp_path / "f32", init_params(cfg, seed=1), spec)
    task = tmp_path / "task"
    (task / "qrels").mkdir(parents=True)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()[:8]]
    with gzip.open(task / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": r["positive"]}) + "\n" for i, r in enumerate(rows))
    with gzip.open(task / "queries.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n" for i, r in enumerate(rows))
    (task / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(8)))
    got = build_table(model, tmp_path / "table", task=task, schemes=["int4"], block=16,
                      train_config=f"{tiny_config}:{pairs}", qat_steps=1, control=False,
                      overrides=["checkpoint.every_steps=1", "optimizer.warmup_steps=0"], log=lambda *_: None)
    assert list(got) == ["f32", "ptq_int4", "qat_int4"]
    assert all(0 <= r["ndcg@10"] <= 1 for r in got.values())
    assert got["qat_int4"]["bytes_on_disk"] < 0.5 * got["f32"]["bytes_on_disk"]
    spec = json.loads((tmp_path / "table" / "qat_int4_export" / "model.json").read_text())
    assert spec["quantization"]["scheme"] == "int4"
    assert "| qat_int4 |" in markdown(got) and (tmp_path / "table" / "table.md").is_file()
