"""Distillation end to end on tiny models: a sentence-transformers BERT teacher (width 32, WordPiece)
stored by `python -m embedder.distill teacher`, a Gemma GGUF student (width 64, SentencePiece)
trained on its signals through the gradient cache; the export holds the student alone."""
import json
import subprocess
import sys

import numpy as np
import pytest

from gguf_files import train_bpe_model, write_tiny_gemma_gguf
from test_finetune import REPO, _pairs_with_negatives, _st_folder

pytest.importorskip("gguf")
pytest.importorskip("transformers")


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_a_teacher_of_another_width_and_tokenizer_distils_into_a_gemma_student(tmp_path):
    teacher = _st_folder(tmp_path / "teacher")
    bpe = train_bpe_model(tmp_path / "bpe")
    student = write_tiny_gemma_gguf(tmp_path / "student.gguf", bpe, quantized=False, hidden=64, heads=2, kv_heads=1,
                                    head_dim=32, mlp=128, layers=2, window=8)
    data = _pairs_with_negatives(tmp_path / "pairs.jsonl")
    signals = tmp_path / "signals"
    proc = _run("-m", "embedder.distill", "teacher", "--teacher", str(teacher), "--data", str(data),
                "--out", str(signals), "--store", "both")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "texts/s" in proc.stderr
    manifest = json.loads((signals / "signals.json").read_text())
    assert manifest["width"] == 32 and manifest["counts"]["queries"] == 24
    # A second teacher into the same directory is refused in one line.
    other = _run("-m", "embedder.distill", "teacher", "--teacher", str(student), "--data", str(data),
                 "--out", str(signals))
    assert other.returncode == 2 and "another pass" in other.stderr and len(other.stderr.strip().splitlines()) == 1

    workdir = tmp_path / "run"
    proc = _run("-m", "embedder.train", "--config", f"{REPO}/experiments/finetune.py:{student}",
                f"--config.data.datasets={data}", "--workdir", str(workdir), "--config.total_steps=2",
                "--config.log_every=1", "--config.optimizer.warmup_steps=0", "--config.batch_size=8",
                "--config.grad_cache_chunks=2", "--config.data.query_max_length=16",
                "--config.data.document_max_length=32", f"--config.data.teacher={signals}",
                "--config.loss.distill_embedding_weight=1.0", "--config.loss.distill_score_weight=1.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/distill_query" in r]
    assert train and all(np.isfinite(train[-1][f"train/{k}"]) for k in
                         ("distill_query", "distill_positive", "distill_negative", "distill_embedding",
                          "distill_score", "nce"))
    from embedder import Embedder
    from embedder.model_store import param_metadata
    assert not any(p.startswith("teacher_projection") for p in param_metadata(workdir / "export"))
    assert not any(p.startswith("teacher_projection") for p in param_metadata(workdir))   # the step, read back
    assert Embedder.load(workdir / "export").encode(["w1 query"]).shape == (1, 64)
