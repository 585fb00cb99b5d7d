"""experiments/finetune.py: one command fine-tunes a sentence-transformers folder or a GGUF file on
a JSONL file whose records carry hard negatives, and the negatives reach the train step."""
import json
import pathlib
import subprocess
import sys

import pytest

from gguf_files import train_bpe_model, write_tiny_gemma_gguf

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 64


def _st_folder(folder: pathlib.Path) -> pathlib.Path:
    """A tiny random BERT as a sentence-transformers folder (Transformer + mean Pooling)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
    transformers.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_mean_tokens": True}))
    return folder


def _pairs_with_negatives(path: pathlib.Path, n: int = 24) -> pathlib.Path:
    """`n` records; most carry two hard negatives, every third one."""
    with open(path, "w") as f:
        for i in range(n):
            negatives = [f"w{(i + 7) % 50} w{(i + 9) % 50} other {i}"] * (1 if i % 3 == 0 else 2)
            negatives = [f"{t} {j}" for j, t in enumerate(negatives)]
            f.write(json.dumps({"query": f"w{i % 50} query {i}", "positive": f"w{i % 50} w{(i + 1) % 50} doc {i}",
                                "negatives": negatives}) + "\n")
    return path


def _finetune(source, data, workdir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "embedder.train", "--config", f"{REPO}/experiments/finetune.py:{source}",
           f"--config.data.datasets={data}", "--workdir", str(workdir),
           "--config.total_steps=1", "--config.optimizer.warmup_steps=0", "--config.batch_size=8",
           "--config.data.query_max_length=16", "--config.data.document_max_length=32"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)


def _check_run(proc, workdir: pathlib.Path, source) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    # What came from the source, and where the prepared data went.
    assert f"from init_from={source}" in log
    assert f"prepared datasets are kept in {workdir / 'data'}" in log
    assert (workdir / "data").is_dir()
    # The negatives were counted and used: K = 2, and the compiled step took [B, 2, L] negatives.
    assert "records carry up to 2 hard negative(s); each row takes 2 (data.num_negatives=-1" in log
    assert "negative_ids[8, 2, " in log
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1
    assert (workdir / "export" / "model.json").is_file()


def test_finetune_a_sentence_transformers_folder_on_pairs_with_negatives(tmp_path):
    source = _st_folder(tmp_path / "st")
    data = _pairs_with_negatives(tmp_path / "pairs.jsonl")
    proc = _finetune(source, data, tmp_path / "run")
    _check_run(proc, tmp_path / "run", source)
    spec = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert spec["model"]["family"] == "bert" and spec["tokenizer"]["kind"] == "wordpiece"
    assert spec["prompts"] is None   # the source has none: raw text
    assert tuple(spec["model"]["mrl_dims"]) == (32,)   # the width; no halving below 64


def test_finetune_a_gguf_file_on_pairs_with_negatives(tmp_path):
    bpe = train_bpe_model(tmp_path / "bpe")
    source = write_tiny_gemma_gguf(tmp_path / "tiny.gguf", bpe, quantized=False, hidden=64, heads=2, kv_heads=1,
                                   head_dim=32, mlp=128, layers=2, window=8)
    data = _pairs_with_negatives(tmp_path / "pairs.jsonl")
    proc = _finetune(source, data, tmp_path / "run")
    _check_run(proc, tmp_path / "run", source)
    spec = json.loads((tmp_path / "run" / "export" / "model.json").read_text())
    assert spec["model"]["family"] == "gemma" and spec["tokenizer"]["kind"] == "sentencepiece"


def test_print_config_lists_every_field_and_help_exits_0(tmp_path):
    source = _st_folder(tmp_path / "st")
    proc = subprocess.run([sys.executable, "-m", "embedder.train", "--config",
                           f"{REPO}/experiments/finetune.py:{source}", "--print_config",
                           "--config.data.datasets=a.jsonl", "--config.model.projection_dims=(16,)",
                           "--config.model.mrl_dims=(16, 8)"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "--config.data.datasets=a.jsonl" in lines and "--config.data.num_negatives=-1" in lines
    assert f"--config.init_from={source}" in lines and "--config.model.family=bert" in lines
    assert "--config.model.projection_dims=(16,)" in lines and "--config.model.mrl_dims=(16, 8)" in lines
    assert any(line.startswith("--config.loss.temperature=") for line in lines)
    # A list field takes JSON (ml_collections' flags cannot override lists), as --print_config writes it.
    datasets = '[{"name": "mine", "files": ["a.jsonl"], "weight": 2}, {"name": "more", "files": ["b.jsonl"]}]'
    base = [sys.executable, "-m", "embedder.train", "--config", f"{REPO}/experiments/finetune.py:{source}", "--print_config"]
    proc = subprocess.run(base + [f"--config.data.datasets={datasets}"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and f"--config.data.datasets={datasets}" in proc.stdout.splitlines(), proc.stderr
    proc = subprocess.run(base + ["--config.model.family=[1]"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "FATAL Flags parsing error: --config.model.family: the config has no list field"), proc.stderr
    helped = subprocess.run([sys.executable, "-m", "embedder.train", "--help"], capture_output=True, text=True,
                            cwd=REPO)
    assert helped.returncode == 0 and "--print_config" in helped.stdout


def test_a_missing_data_file_list_says_which_flag_to_set(tmp_path):
    from embedder.data.data_config import dataset_entries, default_data_config

    c = default_data_config()
    with c.ignore_type():
        c.datasets = ""
    with pytest.raises(ValueError, match="--config.data.datasets=pairs.jsonl"):
        dataset_entries(c)
    c.datasets = "a.jsonl.gz, b.jsonl"
    assert dataset_entries(c) == [{"name": "a", "builder": "jsonl", "files": ["a.jsonl.gz", "b.jsonl"],
                                   "task": "search result", "weight": 1.0}]
