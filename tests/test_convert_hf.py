"""Our encoders on converted HF checkpoints equal transformers (CPU torch, f32) on the same weights."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from embedder.convert.from_hf import read_hf_folder  # noqa: E402
from embedder.convert.hf_mapping import encoder_rules, get_path, params_to_hf  # noqa: E402
from embedder.model import EmbeddingModel  # noqa: E402

LENGTHS = [12, 7, 3]  # unequal, padded to 12, longer than every sliding window below
VOCAB = 96


def _randomise(model, seed):
    # HF initialises norms to 0 / 1 and biases to 0; random values make every mapping matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _batch():
    rng = np.random.default_rng(0)
    length = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), length), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = rng.integers(4, VOCAB, n)
        mask[i, :n] = 1
    return ids, mask


def _additive_mask(mask, window=None):
    """4-D float mask: key j visible to query i when j is real and (|i - j| < window)."""
    keep = mask[:, None, None, :].astype(bool)
    if window is not None:
        pos = np.arange(mask.shape[1])
        keep = keep & (np.abs(pos[:, None] - pos[None, :]) < window)[None, None]
    return torch.tensor(np.where(keep, 0.0, torch.finfo(torch.float32).min), dtype=torch.float32)


def _save(model, folder, sp_model=None):
    model.save_pretrained(folder, safe_serialization=True)
    if sp_model is not None:
        shutil.copyfile(sp_model, folder / "tokenizer.model")


def _masked_mean(hidden, mask):
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / m.sum(1)


def _ours(folder, ids, mask):
    hf = read_hf_folder(folder)
    model = EmbeddingModel(hf.config)
    emb, hidden = model.apply({"params": hf.params}, jnp.asarray(ids), jnp.asarray(mask),
                              return_hidden=True)
    return hf, np.asarray(emb), np.asarray(hidden)


def _compare(ref_hidden, hidden, emb, mask):
    real = mask.astype(bool)
    # Padding positions are never used (pooling masks them), so compare real tokens only.
    np.testing.assert_allclose(hidden[real], ref_hidden[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(emb, _masked_mean(ref_hidden, mask), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sp_model(repo_root):
    return repo_root / "embedder" / "assets" / "debian_sp8k.model"


GEMMA_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, head_dim=8, pad_token_id=0)


def test_gemma1_matches_transformers(tmp_path, sp_model):
    cfg = transformers.GemmaConfig(num_key_value_heads=1, **GEMMA_COMMON)  # MQA
    ref = _randomise(transformers.GemmaModel(cfg), 1).eval()
    _save(ref, tmp_path, sp_model)
    ids, mask = _batch()
    # HF Gemma is causal; a ready 4-D mask is passed through unchanged (masking_utils returns
    # 4-D masks as-is), so an all-visible-except-padding mask makes it bidirectional.
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=_additive_mask(mask)).last_hidden_state.numpy()
    hf, emb, hidden = _ours(tmp_path, ids, mask)
    assert hf.config.family == "gemma" and not hf.config.use_post_attn_norm
    _compare(out, hidden, emb, mask)


def test_gemma2_matches_transformers_with_softcap_and_window(tmp_path, sp_model):
    cfg = transformers.Gemma2Config(num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=1.5, final_logit_softcapping=30.0,
                                    **GEMMA_COMMON)  # GQA, small cap so it bites
    ref = _randomise(transformers.Gemma2Model(cfg), 2).eval()
    _save(ref, tmp_path, sp_model)
    ids, mask = _batch()
    # Gemma2Model takes a dict {layer type: 4-D mask} as-is; the local layers get the symmetric
    # window |i - j| < sliding_window that our bidirectional local layers use.
    masks = {"full_attention": _additive_mask(mask),
             "sliding_attention": _additive_mask(mask, window=4)}
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=masks).last_hidden_state.numpy()
    hf, emb, hidden = _ours(tmp_path, ids, mask)
    assert hf.config.layer_types == ("local", "global") and hf.config.attn_logit_softcap == 1.5
    _compare(out, hidden, emb, mask)


def test_gemma3_bidirectional_matches_transformers(tmp_path, sp_model):
    cfg = transformers.Gemma3TextConfig(
        num_key_value_heads=2, sliding_window=6, use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
        **GEMMA_COMMON)
    ref = _randomise(transformers.Gemma3TextModel(cfg), 3).eval()
    _save(ref, tmp_path, sp_model)
    ids, mask = _batch()
    with torch.no_grad():  # Gemma3TextModel builds the bidirectional masks itself
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    hf, emb, hidden = _ours(tmp_path, ids, mask)
    c = hf.config
    # transformers stores 6 and attends |i - j| < 6 // 2 + 1 = 4 on local layers.
    assert c.sliding_window == 4 and c.use_qk_norm and c.rope_scale_global == 2.0
    assert c.rope_base_local == 50.0 and c.rope_base_global == 1000.0
    _compare(out, hidden, emb, mask)


def _bert_folder(folder, seed=4):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48,
                                  max_position_embeddings=32, type_vocab_size=2)
    ref = _randomise(transformers.BertModel(cfg), seed).eval()
    ref.save_pretrained(folder, safe_serialization=True)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(VOCAB - 4)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(folder / "tokenizer.json"))
    return ref


def test_bert_matches_transformers_via_cli_export(tmp_path):
    src, dst = tmp_path / "hf", tmp_path / "export"
    ref = _bert_folder(src)
    ids, mask = _batch()
    types = np.zeros_like(ids)
    types[:, 2:5] = 1  # token types must reach the embedding sum
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  token_type_ids=torch.tensor(types, dtype=torch.long)).last_hidden_state.numpy()
    proc = subprocess.run([sys.executable, "-m", "embedder.convert", "from-hf", str(src), str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from embedder.model import ModelConfig
    from embedder.model_store import load_model

    params, spec = load_model(dst)
    assert spec["tokenizer"]["kind"] == "wordpiece" and spec["prompts"] is None
    assert (dst / "tokenizer.json").is_file()
    model = EmbeddingModel(ModelConfig.from_dict(spec["model"]))
    emb, hidden = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                              jnp.asarray(types), return_hidden=True)
    _compare(out, np.asarray(hidden), np.asarray(emb), mask)


def test_mapping_round_trips_to_hf_names_and_layouts(tmp_path, sp_model):
    cfg = transformers.Gemma2Config(num_key_value_heads=2, sliding_window=4, **GEMMA_COMMON)
    ref = _randomise(transformers.Gemma2Model(cfg), 5)
    _save(ref, tmp_path, sp_model)
    hf = read_hf_folder(tmp_path)
    body, dense = params_to_hf(hf.params, hf.config)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(body) == set(state) and dense == []
    for name, value in body.items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert len(encoder_rules(hf.config)) == len(state)
    assert get_path(hf.params, ("encoder", "layer_1", "attention", "k", "w")).shape == (32, 2, 8)


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_shapes_only_read_gives_the_arrays_shapes(tmp_path, sp_model, scan_layers):
    # What soups check and shard HF ingredients by, read from the safetensors headers alone.
    cfg = transformers.Gemma2Config(num_key_value_heads=2, sliding_window=4, **GEMMA_COMMON)  # GQA
    _save(_randomise(transformers.Gemma2Model(cfg), 6), tmp_path, sp_model)
    full = read_hf_folder(tmp_path, scan_layers=scan_layers)
    abstract = read_hf_folder(tmp_path, scan_layers=scan_layers, shapes_only=True)
    assert _shapes(abstract.params) == _shapes(full.params)
    assert abstract.spec == full.spec and abstract.config == full.config


def test_cli_help_and_bad_args(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "embedder.convert", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("--help")
    assert ok.returncode == 0 and "from-hf" in ok.stdout
    bad = run("from-hf")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "SRC_DIR" in bad.stderr
    missing = run("from-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 1 and "is not a directory" in missing.stderr
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weird = run("from-hf", str(tmp_path / "weird"), str(tmp_path / "out"))
    assert weird.returncode == 1 and "'llama' is not supported" in weird.stderr
