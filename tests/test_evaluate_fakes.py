"""Tiny deterministic encoder and synthetic task folders shared by the evaluation tests."""
import gzip
import json
import pathlib
import zlib

import numpy as np


class HashingEncoder:
    """Bag of words hashed to Gaussian vectors: texts that share words get close embeddings."""

    def __init__(self, dim=32):
        self.dim = dim
        self.calls = []

    def _word(self, word):
        return np.random.RandomState(zlib.crc32(word.encode())).randn(self.dim).astype(np.float32)

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        self.calls.append({"n": len(texts), "role": role, "task": task, "dim": dim, "titles": titles})
        rows = []
        for i, text in enumerate(texts):
            words = text.lower().split()
            if titles is not None and titles[i]:
                words += titles[i].lower().split()
            v = sum((self._word(w) for w in words), np.zeros(self.dim, np.float32)) + 1e-3
            rows.append(v)
        e = np.stack(rows)[:, :dim or self.dim]
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


TOPICS = {
    "games": "strategy game player level arcade puzzle board",
    "science": "physics chemistry simulation molecule equation numerical",
    "perl": "perl module cpan regex script parser",
    "net": "network packet tcp server socket proxy",
}


def _write(path, records, gz=False):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(str(path) + ".gz", "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")


def _sentence(rng, label, n=5):
    return " ".join(rng.choice(TOPICS[label].split(), n)) + f" x{rng.randint(1000)}"


def make_tasks(root, gz=False, with_meta=True):
    """Write one small task of each type under `root`; returns {type: dir}."""
    root = pathlib.Path(root)
    rng = np.random.RandomState(0)
    labels = list(TOPICS)
    dirs = {}

    d = root / "retrieval"
    docs = [{"_id": f"d{i}", "title": labels[i % 4] if i % 3 == 0 else "", "text": _sentence(rng, labels[i % 4], 8)}
            for i in range(40)]
    queries = [{"_id": f"q{i}", "text": " ".join(docs[i]["text"].split()[:3])} for i in range(12)]
    _write(d / "corpus.jsonl", docs, gz)
    _write(d / "queries.jsonl", queries + [{"_id": "unjudged", "text": "nothing"}], gz)
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t{1 + i % 2}" for i in range(12)] + ["q0\td4\t1"]
    (d / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    dirs["retrieval"] = d

    d = root / "classification"
    _write(d / "train.jsonl", [{"text": _sentence(rng, labels[i % 4]), "label": labels[i % 4]} for i in range(48)], gz)
    _write(d / "test.jsonl", [{"text": _sentence(rng, labels[i % 4]), "label": labels[i % 4]} for i in range(24)], gz)
    dirs["classification"] = d

    d = root / "clustering"
    _write(d / "test.jsonl", [{"text": _sentence(rng, labels[i % 4]), "label": labels[i % 4]} for i in range(40)], gz)
    dirs["clustering"] = d

    d = root / "sts"
    pairs = []
    for i in range(20):
        a = _sentence(rng, labels[i % 4])
        same = i % 2 == 0
        b = _sentence(rng, labels[i % 4] if same else labels[(i + 1) % 4])
        pairs.append({"sentence1": a, "sentence2": b, "score": (4.0 if same else 1.0) + rng.rand()})
    _write(d / "test.jsonl", pairs, gz)
    dirs["sts"] = d

    d = root / "pairs"
    _write(d / "test.jsonl", [{"sentence1": p["sentence1"], "sentence2": p["sentence2"], "label": int(p["score"] > 3)}
                              for p in pairs], gz)
    dirs["pair_classification"] = d

    d = root / "reranking"
    rer = []
    for i in range(8):
        label = labels[i % 4]
        rer.append({"query": _sentence(rng, label, 3), "positive": [_sentence(rng, label) for _ in range(2)],
                    "negative": [_sentence(rng, labels[(i + j) % 4]) for j in (1, 2, 3)]})
    _write(d / "test.jsonl", rer, gz)
    dirs["reranking"] = d

    if with_meta:
        for kind, d in dirs.items():
            (d / "task.json").write_text(json.dumps({"type": kind, "name": f"Toy{kind}", "prompt": f"p-{kind}"}))
    return dirs


def test_hashing_encoder_is_a_usable_fake():
    enc = HashingEncoder(dim=16)
    e = enc.encode(["perl module cpan", "perl module regex", "tcp packet proxy"])
    assert e.shape == (3, 16) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]
