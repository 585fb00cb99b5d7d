"""experiments/distill_gemma.py's plumbing on tiny models: a tiny Gemma GGUF as the recipe's stage-1
model, a tiny BERT teacher, both stage-2 runs and the three scores on a tiny retrieval task."""
import json
import shutil
import subprocess
import sys

import pytest

from gguf_files import train_bpe_model, write_tiny_gemma_gguf
from test_finetune import REPO, _pairs_with_negatives, _st_folder

pytest.importorskip("gguf")
pytest.importorskip("transformers")


def _task(folder):
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": f"w{i} w{i + 1} doc {i}"} for i in range(12)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"w{i} query {i}"}) + "\n"
                                                  for i in range(6)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    return folder


def test_driver_trains_both_runs_and_scores_them(tmp_path):
    from embedder.convert.from_gguf import convert_from_gguf

    bpe = train_bpe_model(tmp_path / "bpe")
    gguf = write_tiny_gemma_gguf(tmp_path / "tiny.gguf", bpe, quantized=False, hidden=64, heads=2, kv_heads=1,
                                 head_dim=32, mlp=128, layers=2, window=8)
    recipe = tmp_path / "recipe"
    convert_from_gguf(gguf, recipe / "base")
    shutil.copytree(recipe / "base", recipe / "stage1" / "export")   # stands in for the stage-1 model
    _pairs_with_negatives(recipe / "mined.jsonl", n=32)
    proc = subprocess.run([sys.executable, "experiments/distill_gemma.py", "--recipe", str(recipe),
                           "--teacher", str(_st_folder(tmp_path / "teacher")), "--workdir", str(tmp_path / "wd"),
                           "--quick", "--steps", "2", "--task", str(_task(tmp_path / "task"))],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert set(rows) == {"teacher", "plain", "distilled"}
    assert "nDCG@10 @32" in rows["teacher"] and "nDCG@10 @768" in rows["distilled"]
    metrics = [json.loads(line) for line in (tmp_path / "wd" / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/distill_embedding" in m for m in metrics)
    assert not any("train/distill_embedding" in m for m in
                   map(json.loads, (tmp_path / "wd" / "plain" / "metrics.jsonl").read_text().splitlines()))
    # --plain takes a finished run as the plain one only when it trained with the plain config.
    common = [sys.executable, "experiments/distill_gemma.py", "--recipe", str(recipe), "--teacher",
              str(tmp_path / "teacher"), "--workdir", str(tmp_path / "wd"), "--quick", "--steps", "2",
              "--task", str(tmp_path / "task")]
    proc = subprocess.run(common + ["--plain", str(tmp_path / "wd" / "distilled")], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    assert proc.returncode != 0 and "trained with another config (data.teacher:" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(common + ["--plain", str(tmp_path / "wd" / "plain")], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "wd" / "results.json").read_text()) == rows
