"""scan_layers: the scanned encoder equals the unrolled one on the same (stacked) weights, in
outputs and gradients; the layout converters, sharding, HF conversion and compile size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from embedder import sharding as S
from embedder.model import EmbeddingModel, ModelConfig, get_model_config
from embedder.model.layer_stack import (is_stacked, match_layer_layout, stack_layers,
                                        unstack_layers)

LENGTH = 10


def _config(family, **kw):
    if family == "gemma":
        # A local and a global layer, a window (3) far shorter than the sequence, scaled global
        # RoPE and distinct bases, so selecting the wrong kind in any layer changes the output.
        base = dict(vocab_size=128, num_layers=2, layer_types=("local", "global"),
                    sliding_window=3, rope_base_local=50.0, rope_base_global=1000.0,
                    rope_scale_global=2.0, projection_dims=(24,), mrl_dims=(24, 8))
        return get_model_config("tiny", **{**base, **kw})
    return get_model_config("tiny-bert", **{"vocab_size": 128, "num_layers": 2, **kw})


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (3, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # padded rows: padding must stay out of every layer's keys
    mask[2, 2:] = 0
    return jnp.asarray(ids * mask), jnp.asarray(mask)


def _params(cfg, seed=0):
    """Random unrolled params of `cfg` (numpy; no init is run: eager init costs seconds)."""
    ids, mask = _batch()
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        EmbeddingModel(cfg.replace(scan_layers=False)).init(jax.random.key(0), ids, mask)["params"]))
    rng = np.random.default_rng(seed)
    # Random norm scales and biases too (init makes them constants), so every mapping matters.
    return jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), abstract)


def _value_and_grad(cfg, grads=True):
    model = EmbeddingModel(cfg)
    ids, mask = _batch()
    weights = jax.random.normal(jax.random.key(7), (cfg.embedding_dim,))

    def loss(params):
        emb, hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
        real = mask[..., None].astype(jnp.float32)
        return jnp.sum(emb @ weights) + jnp.sum(jnp.square(hidden) * real) / 100.0, (emb, hidden)

    if not grads:
        return jax.jit(lambda p: ((None, loss(p)[1]), None))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


# Every pair of (family, remat), (family, impl) and (remat, impl) appears once: pairwise
# coverage at half the compiles of the full product. Gradients where they differ most (the
# mixed gemma pattern, remat); the plain BERT block's forward only (a backward costs 3x).
CASES = [("gemma", "none", "xla", True), ("gemma", "full", "dot_product_attention", True),
         ("bert", "none", "dot_product_attention", False), ("bert", "full", "xla", True)]


@pytest.mark.parametrize("family,remat,impl,grads", CASES)
def test_scanned_forward_and_gradients_equal_unrolled(family, remat, impl, grads):
    cfg = _config(family, remat=remat, attention_impl=impl)
    scfg = cfg.replace(scan_layers=True)
    params = _params(cfg)
    stacked = stack_layers(params, cfg)
    # The scanned model's own init has exactly the stacked layout.
    ids, mask = _batch()
    own = jax.eval_shape(lambda: nn.meta.unbox(EmbeddingModel(scfg).init(jax.random.key(0), ids, mask)["params"]))
    assert jax.tree.structure(own) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, stacked)

    (_, (emb, hidden)), g = _value_and_grad(cfg, grads)(params)
    (_, (semb, shidden)), sg = _value_and_grad(scfg, grads)(stacked)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(semb), np.asarray(emb), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(shidden)[real], np.asarray(hidden)[real], atol=1e-5, rtol=0)
    if not grads:
        return
    assert is_stacked(sg)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(stack_layers(g, cfg))[0], jax.tree.leaves(sg)):
        scale = max(1.0, float(jnp.max(jnp.abs(a))))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_single_kind_pattern_and_dropout_under_scan():
    # All-local gemma: the window stays static under scan (no per-layer selection).
    cfg = _config("gemma", layer_types=("local", "local"))
    scfg = cfg.replace(scan_layers=True)
    params = _params(cfg)
    sp = stack_layers(params, cfg)
    ids, mask = _batch()
    a = jax.jit(lambda p: EmbeddingModel(cfg).apply({"params": p}, ids, mask))(params)
    # Dropout under scan: a training forward differs from the deterministic one but is
    # reproducible from the key; dropout 0.3 at deterministic=True is the plain forward.
    model = EmbeddingModel(scfg.replace(dropout_rate=0.3))
    run = jax.jit(lambda p, k, d: model.apply({"params": p}, ids, mask, deterministic=d,
                                              rngs={"dropout": k}), static_argnums=2)
    b = run(sp, jax.random.key(1), True)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    train = np.asarray(run(sp, jax.random.key(1), False))
    np.testing.assert_array_equal(train, np.asarray(run(sp, jax.random.key(1), False)))
    assert not np.allclose(train, np.asarray(b), atol=1e-3)


def test_stack_unstack_round_trip_is_exact_numpy_and_jax():
    cfg = _config("gemma", num_layers=3, layer_types=("local", "global", "local"))
    host = _params(cfg)
    params = jax.tree.map(jnp.asarray, host)
    for tree in (params, host):
        stacked = stack_layers(tree, cfg)
        assert set(stacked["encoder"]) == {"embedding", "final_norm", "layers"}
        q = stacked["encoder"]["layers"]["attention"]["q"]["w"]
        assert q.shape == (3, 64, 4, 16)
        assert isinstance(q, np.ndarray) == (tree is host)
        back = unstack_layers(stacked, cfg)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
        assert count(stacked) == count(tree)
    # Boxed (logically partitioned) trees gain / lose the "layers" axis name.
    ids, mask = _batch()
    boxed = jax.tree.map(
        lambda b: b.replace_boxed(np.zeros(b.value.shape, b.value.dtype)),
        jax.eval_shape(lambda: EmbeddingModel(cfg).init(jax.random.key(0), ids, mask)["params"]),
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    sboxed = stack_layers(boxed, cfg)
    assert sboxed["encoder"]["layers"]["mlp"]["up"]["w"].names == ("layers", "embed", "mlp")
    assert unstack_layers(sboxed, cfg)["encoder"]["layer_2"]["mlp"]["up"]["w"].names == ("embed", "mlp")
    # match_layer_layout converts whichever way the config asks, and is a no-op otherwise.
    scfg = cfg.replace(scan_layers=True)
    assert is_stacked(match_layer_layout(host, scfg)) and match_layer_layout(host, cfg) is host
    assert not is_stacked(match_layer_layout(stack_layers(host, cfg), cfg))


def test_layout_errors_are_clear():
    cfg = _config("gemma", num_layers=3, layer_types=("local", "global", "local"))
    params = _params(cfg)
    with pytest.raises(ValueError, match="already stacked"):
        stack_layers(stack_layers(params, cfg), cfg)
    with pytest.raises(ValueError, match="unrolled already"):
        unstack_layers(params, cfg)
    with pytest.raises(ValueError, match="beyond num_layers=2"):
        stack_layers(params, cfg.replace(num_layers=2, layer_types=("local", "global")))
    with pytest.raises(ValueError, match="leading axis of num_layers=4"):
        unstack_layers(stack_layers(params, cfg), cfg.replace(num_layers=4, layer_types=("local",) * 4))
    with pytest.raises(ValueError, match="'encoder' entry"):
        stack_layers({"params": params}, cfg)
    with pytest.raises(ValueError, match="scan_layers"):
        ModelConfig(scan_layers="yes")


def test_sharded_init_puts_no_mesh_axis_on_the_layer_axis():
    cfg = _config("gemma", scan_layers=True, num_layers=3, layer_types=("local", "global", "local"))
    mesh = S.make_mesh({"axes": ("data", "fsdp", "tensor"), "shape": (1, 4, 2)})
    model = EmbeddingModel(cfg)
    ids, mask = _batch()
    ids, mask = jnp.concatenate([ids, ids[:1]]), jnp.concatenate([mask, mask[:1]])  # batch 4
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
    shardings = S.param_shardings(abstract, mesh, S.DEFAULT_RULES)
    layers = shardings["encoder"]["layers"]
    for path, s in jax.tree_util.tree_flatten_with_path(layers)[0]:
        assert s.spec[0] is None, jax.tree_util.keystr(path)
    assert layers["attention"]["q"]["w"].spec == P(None, "fsdp", "tensor", None)
    assert layers["mlp"]["down"]["w"].spec == P(None, "tensor", "fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(S.DEFAULT_RULES):
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, ids, mask)["params"]),
                         out_shardings=shardings)(jax.random.key(0))
        batch = S.host_to_global({"ids": np.asarray(ids), "mask": np.asarray(mask)}, mesh)
        emb = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, batch["ids"], batch["mask"])
    q = params["encoder"]["layers"]["attention"]["q"]["w"]
    assert q.shape == (3, 64, 4, 16) and q.sharding.spec == P(None, "fsdp", "tensor", None)
    # Different layers got different initial weights (params rngs split over the scan).
    assert not np.allclose(np.asarray(q[0]), np.asarray(q[1]))
    ref = jax.jit(lambda p: model.apply({"params": p}, ids, mask))(jax.device_get(params))
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref), atol=1e-5)


def _hlo_chars(cfg):
    ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    model = EmbeddingModel(cfg)
    abstract = jax.eval_shape(lambda i: nn.meta.unbox(model.init(jax.random.key(0), i, i)["params"]), ids)
    return len(jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)).lower(abstract, ids, ids).as_text())


def test_scanned_program_is_much_smaller_than_unrolled():
    pattern = ("local",) * 5 + ("global",)
    cfg = _config("gemma", num_layers=12, layer_types=pattern * 2)
    unrolled, scanned = _hlo_chars(cfg), _hlo_chars(cfg.replace(scan_layers=True))
    # One layer body instead of twelve: the program text shrinks several-fold.
    assert scanned < unrolled / 3, (scanned, unrolled)


def test_hf_round_trip_through_a_scanned_export(tmp_path, repo_root):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from embedder import Embedder
    from embedder.checkpoint import save_params
    from embedder.convert.from_hf import convert_from_hf, read_hf_folder
    from embedder.convert.to_hf import convert_to_hf

    src = tmp_path / "hf"
    hf_cfg = transformers.Gemma3TextConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=6,
        use_bidirectional_attention=True, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    ref = transformers.Gemma3TextModel(hf_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref.save_pretrained(src)
    import shutil

    shutil.copyfile(repo_root / "embedder" / "assets" / "debian_sp8k.model", src / "tokenizer.model")
    original = load_file(str(src / "model.safetensors"))

    scanned = read_hf_folder(src, scan_layers=True)
    assert scanned.config.scan_layers and scanned.spec["model"]["scan_layers"] is True
    assert scanned.params["encoder"]["layers"]["attention"]["k"]["w"].shape == (3, 32, 2, 8)
    export = convert_from_hf(src, tmp_path / "export", scan_layers=True)
    out = convert_to_hf(export, tmp_path / "back")
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    # The scanned export loads and encodes as the unrolled conversion of the same folder does.
    unrolled = read_hf_folder(src)
    save_params(tmp_path / "unrolled", unrolled.params, unrolled.spec, tokenizer_file=unrolled.tokenizer_file)
    texts = ["a debian package", "the linux kernel headers for building modules"]
    a = Embedder.load(tmp_path / "unrolled").encode(texts, role="document")
    b = Embedder.load(export).encode(texts, role="document")
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_full_size_scanned_config_has_the_unrolled_parameters():
    # eval_shape only: Gemma 3 1B (26 mixed layers) stacks to the same shapes and count.
    cfg = get_model_config("gemma3-1b", scan_layers=True)
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    abstract = lambda c: jax.eval_shape(  # noqa: E731
        lambda i: nn.meta.unbox(EmbeddingModel(c).init(jax.random.key(0), i, i)["params"]), ids)
    scanned, unrolled = abstract(cfg), abstract(cfg.replace(scan_layers=False))
    assert scanned["encoder"]["layers"]["mlp"]["gate"]["w"].shape == (26, 1152, 6912)
    assert (jax.tree.map(lambda x: x.shape, stack_layers(unrolled, cfg))
            == jax.tree.map(lambda x: x.shape, scanned))
    assert (jax.tree.map(lambda x: x.shape, unstack_layers(scanned, cfg))
            == jax.tree.map(lambda x: x.shape, unrolled))


def test_unrolled_export_loads_into_a_scanned_run_and_embedder(tmp_path, repo_root):
    """`init_from` an unrolled export (every HF conversion is one) into a scan_layers run, and
    `Embedder(config_overrides={"scan_layers": True})` of it: both restack the layers."""
    from jax.sharding import Mesh, NamedSharding

    from embedder import Embedder
    from embedder.checkpoint import save_params
    from embedder.train.init_from import load_init_params

    cfg = _config("gemma")
    params = _params(cfg, seed=5)
    spec = {"model": cfg.to_dict(), "tokenizer": {"kind": "sentencepiece", "file": "debian_sp8k.model",
                                                  "max_length": 16},
            "prompts": {"query": None, "document": None}}
    save_params(tmp_path / "export", params, spec,
                tokenizer_file=repo_root / "embedder" / "assets" / "debian_sp8k.model")

    scanned_cfg = cfg.replace(scan_layers=True)
    ids, mask = _batch()
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        EmbeddingModel(scanned_cfg).init(jax.random.key(0), ids, mask)["params"]))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    fresh = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), NamedSharding(mesh, P())), abstract)
    loaded, report = load_init_params(str(tmp_path / "export"), fresh, scanned_cfg)
    assert report.fresh == () and report.unused == ()
    expected = stack_layers(params, scanned_cfg)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, expected)

    texts = ["a debian package", "kernel headers for building out-of-tree modules"]
    plain = Embedder.load(tmp_path / "export").encode(texts, role="document")
    scanned = Embedder.load(tmp_path / "export", config_overrides={"scan_layers": True})
    assert is_stacked(jax.device_get(scanned.params))
    np.testing.assert_allclose(scanned.encode(texts, role="document"), plain, atol=1e-5, rtol=0)
