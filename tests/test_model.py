"""Model: named configs against published sizes, masks and pooling against loops, sharded ==
single-device, remat / attention implementations / dtype / dropout behaviour."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder.model import MODEL_NAMES, EmbeddingModel, ModelConfig, get_model_config, mean_pool
from embedder.model.attention import attention_mask

# Published parameter counts (model cards / papers); MiniLM's 22.7M includes BERT's pooler,
# which an embedding model does not use (384*384 + 384 parameters).
PUBLISHED = {"gemma-2b": 2.51e9, "gemma2-2b": 2.61e9, "gemma3-270m": 268e6, "gemma3-1b": 1.0e9,
             "gemma3-4b": 3.88e9, "gemma3-12b": 11.77e9, "gemma3-27b": 27.0e9,
             "embeddinggemma-300m": 308e6, "minilm-l6": 22.7e6 - (384 * 384 + 384)}

# The same sizes as transformers configs (values from the HF config.json files).
HF_CONFIGS = {
    "gemma-2b": ("GemmaConfig", "GemmaModel", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256)),
    "gemma2-2b": ("Gemma2Config", "Gemma2Model", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256)),
    "gemma3-270m": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256)),
    "gemma3-1b": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256)),
    "gemma3-4b": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256)),
    "gemma3-12b": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256)),
    "gemma3-27b": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128)),
    "embeddinggemma-300m": ("Gemma3TextConfig", "Gemma3TextModel", dict(vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3, num_key_value_heads=1, head_dim=256)),
    "minilm-l6": ("BertConfig", "BertModel", dict(vocab_size=30522, hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, add_pooling_layer=False)),
}


def _abstract_params(cfg, length=8):
    ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
    return jax.eval_shape(lambda i, m: EmbeddingModel(cfg).init(jax.random.key(0), i, m)["params"], ids, ids)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def test_named_configs_eval_shape_and_match_published_sizes():
    # Full-depth eval_shape of every named config (27B included: a few seconds, nothing allocated).
    counts = {name: _count(_abstract_params(get_model_config(name))) for name in MODEL_NAMES}
    for name, published in PUBLISHED.items():
        assert counts[name] == pytest.approx(published, rel=5e-3), name
    # Exact counts against transformers models built on the meta device (no memory).
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name, (cfg_cls, model_cls, kw) in HF_CONFIGS.items():
        add_pooling = kw.pop("add_pooling_layer", True)
        hf_cfg = getattr(transformers, cfg_cls)(**kw)
        with torch.device("meta"):
            model = getattr(transformers, model_cls)(hf_cfg, **({} if add_pooling else {"add_pooling_layer": False}))
        hf_count = sum(p.numel() for p in model.parameters())
        head = sum(a * b for a, b in zip((kw["hidden_size"],) + get_model_config(name).projection_dims,
                                         get_model_config(name).projection_dims))
        assert counts[name] == hf_count + head, name


def test_config_round_trip_overrides_and_errors():
    cfg = get_model_config("tiny", vocab_size=100, dtype="bfloat16")
    assert cfg.vocab_size == 100 and cfg.embedding_dim == 32
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown model config 'nope'"):
        get_model_config("nope")
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_model_config("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="soft-capping needs the 'xla'"):
        get_model_config("gemma2-2b", attention_impl="cudnn")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"hidden": 3})


def test_attention_mask_matches_loop():
    key_mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    for window in (None, 3):
        got = np.broadcast_to(np.asarray(attention_mask(key_mask, window)), (2, 1, 7, 7))
        for b in range(2):
            for i in range(7):
                for j in range(7):
                    want = bool(key_mask[b, j]) and (window is None or abs(i - j) < window)
                    assert got[b, 0, i, j] == want


def test_mean_pool_matches_loop():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    got = np.asarray(mean_pool(hidden, mask))
    for b in range(3):
        n = mask[b].sum()
        want = sum(hidden[b, t] for t in range(5) if mask[b, t]) / n if n else np.zeros(4)
        np.testing.assert_allclose(got[b], want, atol=1e-6)


def _inputs(vocab=64, lengths=(10, 6, 3, 10, 1, 8, 9, 2)):
    rng = np.random.default_rng(1)
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", ["tiny", "tiny-bert"])
def test_sharded_forward_equals_single_device(name):
    from embedder import sharding

    cfg = get_model_config(name, vocab_size=64)
    model = EmbeddingModel(cfg)
    ids, mask = _inputs()
    mesh = sharding.make_mesh({"axes": ("data", "fsdp", "tensor"), "shape": (2, 2, 2)})
    rules = sharding.logical_rules(None)
    abstract = _abstract_params(cfg, ids.shape[1])
    shardings = sharding.param_shardings(abstract, mesh, rules)
    init = lambda k: nn.meta.unbox(model.init(k, ids, mask)["params"])  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
        batch = jax.device_put((ids, mask), sharding.batch_sharding(mesh, 2))
        emb, hidden = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, return_hidden=True))(
            params, *batch)
    # Born sharded: the big tables really are split over the mesh.
    table = params["encoder"]["embedding" if name == "tiny" else "word_embedding"]
    assert len(table.sharding.device_set) == 8 and table.addressable_shards[0].data.shape == (32, 32)
    host = jax.device_get(params)
    ref_emb, ref_hidden = model.apply({"params": host}, ids, mask, return_hidden=True)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref_emb), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(ref_hidden), atol=1e-5, rtol=0)


def test_remat_attention_impl_and_dtype_variants_agree():
    base = get_model_config("tiny", vocab_size=64)
    ids, mask = _inputs()
    params = EmbeddingModel(base).init(jax.random.key(0), ids, mask)["params"]

    def run(cfg):
        model = EmbeddingModel(cfg)
        loss = lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = run(base)
    # dots_saveable goes through the same nn.remat path as full; one grad check covers both.
    for variant in (dict(remat="full", attention_impl="dot_product_attention"),):
        loss, grad = run(base.replace(**variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(variant))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=str(variant))
    emb16 = jax.jit(EmbeddingModel(base.replace(dtype="bfloat16")).apply)({"params": params}, ids, mask)
    emb32 = jax.jit(EmbeddingModel(base).apply)({"params": params}, ids, mask)
    assert emb16.dtype == jnp.float32
    cos = jnp.sum(emb16 * emb32, -1) / jnp.linalg.norm(emb16, axis=-1) / jnp.linalg.norm(emb32, axis=-1)
    assert float(jnp.min(cos)) > 0.99


def test_dropout_only_when_not_deterministic():
    cfg = get_model_config("tiny-bert", vocab_size=64, dropout_rate=0.1, attention_dropout_rate=0.1)
    model = EmbeddingModel(cfg)
    ids, mask = _inputs()
    params = model.init(jax.random.key(0), ids, mask)["params"]
    apply = jax.jit(model.apply, static_argnames=("deterministic",))
    a = apply({"params": params}, ids, mask)
    b = apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = apply({"params": params}, ids, mask, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b) and np.array_equal(b, c)
    np.testing.assert_array_equal(a, apply({"params": params}, ids, mask))


def test_padding_does_not_change_embeddings():
    # Local layers with padding queries far from any real token must stay finite and inert.
    cfg = get_model_config("tiny", vocab_size=64)
    model = EmbeddingModel(cfg)
    ids, mask = _inputs(lengths=(3,))
    params = model.init(jax.random.key(0), ids, mask)["params"]
    padded_ids = jnp.pad(ids, ((0, 0), (0, 13)))
    padded_mask = jnp.pad(mask, ((0, 0), (0, 13)))
    short = jax.jit(model.apply)({"params": params}, ids, mask)
    long = jax.jit(model.apply)({"params": params}, padded_ids, padded_mask)
    np.testing.assert_allclose(long, short, atol=1e-5)
    assert np.isfinite(np.asarray(long)).all()


def _np_attention(x, p, key_mask, n, k, keep=None, rate=0.0):
    """Textbook attention in NumPy: softmax(q k^T / sqrt(h) over visible keys), then
    dropout of the probabilities, then the values and the output projection."""
    x = np.asarray(x, np.float64)
    proj = {name: np.einsum("bld,dnh->blnh", x, np.asarray(p[name]["w"], np.float64))
            + np.asarray(p[name]["b"], np.float64) for name in ("q", "k", "v")}
    h = proj["q"].shape[-1]
    group = n // k
    kk = np.repeat(proj["k"], group, axis=2)  # query head n reads kv head n // group
    vv = np.repeat(proj["v"], group, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", proj["q"], kk) / np.sqrt(h)
    logits = np.where(np.asarray(key_mask, bool)[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if keep is not None:
        probs = probs * np.asarray(keep).reshape(probs.shape) / (1 - rate)
    out = np.einsum("bnts,bsnh->btnh", probs, vv)
    return np.einsum("btnh,nhd->btd", out, np.asarray(p["o"]["w"], np.float64)) + np.asarray(p["o"]["b"])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_textbook_softmax_with_dropout(num_kv_heads):
    # The einsum path normalises after the value product and drops unnormalised weights;
    # both must equal softmax -> dropout -> values, for multi-head and grouped heads.
    from embedder.model.attention import Attention

    rate = 0.25
    cfg = get_model_config("tiny-bert", vocab_size=64, num_kv_heads=num_kv_heads,
                           attention_dropout_rate=rate)
    x = jax.random.normal(jax.random.key(0), (2, 7, cfg.hidden_size))
    key_mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    attn = Attention(cfg)
    params = nn.unbox(attn.init(jax.random.key(1), x, key_mask)["params"])
    np.testing.assert_allclose(attn.apply({"params": params}, x, key_mask),
                               _np_attention(x, params, key_mask, cfg.num_heads, num_kv_heads),
                               atol=2e-5)

    dropped = {}

    def record_keep(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dropout):
            dropped["keep"] = np.asarray(out) != 0  # the weights are > 0 wherever a key is visible
        return out

    with nn.intercept_methods(record_keep):
        y = attn.apply({"params": params}, x, key_mask, deterministic=False,
                       rngs={"dropout": jax.random.key(2)})
    keep = dropped["keep"]
    assert 0.5 < keep.mean() < 0.95  # some, not all, weights were dropped
    np.testing.assert_allclose(
        y, _np_attention(x, params, key_mask, cfg.num_heads, num_kv_heads, keep, rate), atol=2e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_kernels_start_at_one_over_sqrt_fan_in(scan_layers):
    # q/k/v kernels are [embed, heads, head_dim]: fan-in is embed alone (heads are outputs),
    # the output kernel [heads, head_dim, embed] has fan-in heads * head_dim.
    embed, heads, head_dim = 256, 8, 32
    cfg = get_model_config("tiny", vocab_size=64, hidden_size=embed, num_heads=heads,
                           num_kv_heads=heads, head_dim=head_dim, scan_layers=scan_layers)
    ids = jnp.ones((1, 4), jnp.int32)
    params = nn.meta.unbox(EmbeddingModel(cfg).init(jax.random.key(0), ids, ids)["params"])
    attn = (params["encoder"]["layers"] if scan_layers else params["encoder"]["layer_0"])["attention"]
    for name, fan_in in [("q", embed), ("k", embed), ("v", embed), ("o", heads * head_dim)]:
        std = float(np.asarray(attn[name]["w"]).std())
        assert std == pytest.approx(fan_in ** -0.5, rel=0.03), (name, std)


def _all_eqns(jaxpr):
    """The equations of `jaxpr` and of every jaxpr nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_accumulating_einsum_rounds_once_and_its_gradients_too():
    """bf16 x bf16 summed in f32 and rounded once, forward and both gradients, against an f32
    einsum of the same bf16 values rounded the same way; bad equations are refused."""
    from embedder.model.einsum import _transposed, accumulating_einsum

    rng = np.random.default_rng(0)
    for eqn, xs, ws in (("BLD,DF->BLF", (2, 5, 64), (64, 48)), ("BLD,DNH->BLNH", (2, 5, 64), (64, 3, 16)),
                        ("TNH,NHD->TD", (7, 3, 16), (3, 16, 64))):
        x = jnp.asarray(rng.normal(size=xs), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=ws), jnp.bfloat16)
        y32 = jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32))
        ct = jnp.asarray(rng.normal(size=y32.shape), jnp.bfloat16)
        y, vjp = jax.vjp(lambda a, b: accumulating_einsum(eqn, a, b), x, w)
        dx, dw = vjp(ct)
        _, vjp32 = jax.vjp(lambda a, b: jnp.einsum(eqn, a, b), x.astype(jnp.float32), w.astype(jnp.float32))
        dx32, dw32 = vjp32(ct.astype(jnp.float32))
        # Every dot, forward and backward, takes two bf16 operands and gives f32: what a plain bf16
        # einsum (bf16 output) or a plain preferred_element_type (f32 x bf16 backward) does not.
        jaxpr = jax.make_jaxpr(lambda a, b, c: jax.vjp(lambda p, q: accumulating_einsum(eqn, p, q), a, b)[1](c))(
            x, w, ct)
        dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        assert len(dots) == 3, dots   # the forward's and the backward's two
        for e in dots:
            assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16, jnp.bfloat16], e
            assert e.outvars[0].aval.dtype == jnp.float32, e
        for got, want in ((y, y32), (dx, dx32), (dw, dw32)):
            assert got.dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32),
                                       rtol=2 ** -7, atol=1e-2)
    assert _transposed("BLD,DF->BLF") == ("BLF,DF->BLD", "BLD,BLF->DF")
    for bad in ("ij,jk->i", "ii,ik->ik", "...d,df->...f"):
        with pytest.raises(ValueError, match="every index"):
            _transposed(bad)


def test_einsum_product_as_one_matmul_equals_the_einsum(monkeypatch):
    """f32 products over grouped axes run as one 2-D matmul on the CPU (no transposed gradient
    copies): same values and gradients as the einsum; bf16 products, other equations and other
    platforms keep the einsum."""
    from embedder.model import einsum as einsum_lib

    assert einsum_lib.matmul_groups("BLD,DF->BLF") == (2, 1)
    assert einsum_lib.matmul_groups("BLD,DNH->BLNH") == (2, 1)
    assert einsum_lib.matmul_groups("TNH,NHD->TD") == (1, 2)
    assert einsum_lib.matmul_groups("BD,DE->BE") == (1, 1)
    for other in ("BLD,FD->BLF", "BLD,DF->LBF", "BTH,BSH->BTS", "BLD,DF->BFL", "BLNH,HN->BL", "ij,jk->ik k"):
        assert einsum_lib.matmul_groups(other) is None, other
    rng = np.random.default_rng(1)
    for eqn, xs, ws in (("BLD,DF->BLF", (2, 5, 8), (8, 6)), ("BLD,DNH->BLNH", (2, 5, 8), (8, 3, 4)),
                        ("TNH,NHD->TD", (7, 3, 4), (3, 4, 8))):
        for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
            x = jnp.asarray(rng.normal(size=xs), dtype)
            w = jnp.asarray(rng.normal(size=ws), dtype)
            ct = jnp.asarray(rng.normal(size=jnp.einsum(eqn, x, w).shape), dtype)
            accumulate = dtype == jnp.bfloat16
            outs = {}
            for flat in (True, False):
                monkeypatch.setattr(einsum_lib, "flatten_dots", lambda flat=flat: flat)
                jaxpr = jax.make_jaxpr(lambda a, b: einsum_lib.einsum_product(eqn, a, b, accumulate))(x, w)
                assert ("reshape" in str(jaxpr)) == (flat and not accumulate), (eqn, flat)
                y, vjp = jax.vjp(lambda a, b: einsum_lib.einsum_product(eqn, a, b, accumulate), x, w)
                outs[flat] = (y, *vjp(ct))
            for got, want in zip(outs[True], outs[False]):
                assert got.shape == want.shape and got.dtype == want.dtype == dtype
                np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                           rtol=tol, atol=tol)
    monkeypatch.undo()
    assert einsum_lib.flatten_dots() == (jax.default_backend() == "cpu")
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):   # inside a trace: the platform of the mesh's devices
        seen = []
        jax.jit(lambda a: seen.append(einsum_lib.dot_platform()) or a).lower(1.0)
    assert seen == [mesh.devices.flat[0].platform]
