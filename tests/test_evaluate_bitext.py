"""Bitext mining task type: metrics against scikit-learn and MTEB's own scorer, loading, runner."""
import gzip
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from embedder.evaluate.bitext import evaluate_bitext_mining, weighted_precision_recall_f1
from embedder.evaluate.report import format_table
from embedder.evaluate.runner import evaluate_task
from embedder.evaluate.tasks import infer_task_type, load_task
from test_evaluate_fakes import HashingEncoder


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _noisy_pairs(n=60, d=16, noise=0.35, seed=0):
    rng = np.random.RandomState(seed)
    b = _unit(rng.randn(n, d))
    a = _unit(b + noise * rng.randn(n, d))
    return a, b


def _reference(a, b, k=10):
    """Plain loops: cosine of every pair, sorted, the gold's rank."""
    n = len(a)
    preds, ndcg, rr, r10 = [], [], [], []
    for i in range(n):
        sims = [float(np.dot(a[i].astype(np.float64), b[j].astype(np.float64))) for j in range(n)]
        order = sorted(range(n), key=lambda j: (-sims[j], j))
        preds.append(order[0])
        rank = order.index(i)
        ndcg.append(1 / np.log2(rank + 2) if rank < k else 0.0)
        rr.append(1 / (rank + 1) if rank < k else 0.0)
        r10.append(float(rank < k))
    return preds, float(np.mean(ndcg)), float(np.mean(rr)), float(np.mean(r10))


def test_bitext_metrics_against_sklearn_and_loops():
    a, b = _noisy_pairs()
    got = evaluate_bitext_mining(a, b)
    preds, ndcg, mrr, r10 = _reference(a, b)
    gold = list(range(len(a)))
    assert 0.2 < got["accuracy"] < 0.95  # neither trivial nor hopeless
    assert got["accuracy"] == pytest.approx(accuracy_score(gold, preds))
    assert got["recall_at_1"] == got["accuracy"]
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert got[name] == pytest.approx(fn(gold, preds, average="weighted", zero_division=0)), name
    assert got["ndcg_at_10"] == pytest.approx(ndcg)
    assert got["mrr_at_10"] == pytest.approx(mrr)
    assert got["recall_at_10"] == pytest.approx(r10)


def test_weighted_scores_with_repeated_and_unseen_classes():
    rng = np.random.RandomState(3)
    labels = rng.randint(0, 6, 80)
    predictions = rng.randint(0, 9, 80)  # classes 6-8 are never gold
    got = weighted_precision_recall_f1(labels, predictions)
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert got[name] == pytest.approx(fn(labels, predictions, average="weighted", zero_division=0)), name


def test_bitext_metrics_agree_with_mteb_on_the_same_embeddings():
    pytest.importorskip("torch")
    mteb_eval = pytest.importorskip("mteb._evaluators.text.bitext_mining_evaluator")
    mteb_task = pytest.importorskip("mteb.abstasks.text.bitext_mining")
    a, b = _noisy_pairs(n=80, seed=1)

    class CosineModel:
        @staticmethod
        def similarity(x, y):
            return np.asarray(x) @ np.asarray(y).T

    neighbours = mteb_eval.BitextMiningEvaluator._similarity_search(None, a, b, CosineModel())
    theirs = mteb_task.AbsTaskBitextMining._compute_metrics(None, neighbours, [(i, i) for i in range(len(a))])
    ours = evaluate_bitext_mining(a, b)
    for name in ("accuracy", "precision", "recall", "f1"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-9), name


def test_bitext_task_loads_infers_and_runs(tmp_path):
    d = tmp_path / "bitext"
    d.mkdir()
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa", "lambda mu"]
    records = [{"sentence1": f"{w} one", "sentence2": f"{w} two"} for w in words]
    with gzip.open(d / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert infer_task_type(d) == "bitext_mining"
    task = load_task(d)
    assert task.type == "bitext_mining" and task.prompt == "sentence similarity"
    enc = HashingEncoder(64)
    result = evaluate_task(enc, task, dims=[64, 32])
    assert result["size"] == {"pairs": 6}
    assert {c["role"] for c in enc.calls} == {"query"} and {c["task"] for c in enc.calls} == {"sentence similarity"}
    full = result["dims"]["64"]
    assert full["accuracy"] == 1.0 and full["f1"] == pytest.approx(1.0) and full["ndcg_at_10"] == 1.0
    assert set(result["dims"]) == {"64", "32"}
    first_row = format_table({"bitext": result}).splitlines()[2].split()
    assert first_row[:3] == ["bitext", "bitext_mining", "f1"]  # MTEB's main metric first
    # a pair-classification file (with labels) is still inferred as such
    (tmp_path / "pc").mkdir()
    (tmp_path / "pc" / "test.jsonl").write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 1}) + "\n")
    assert infer_task_type(tmp_path / "pc") == "pair_classification"


def test_mteb_runs_a_local_bitext_task_and_agrees_with_ours(tmp_path):
    """`local_task` wraps a bitext directory as MTEB's BitextMining: MTEB's evaluator, on our
    encoder's embeddings, gives our accuracy / precision / recall / F1."""
    pytest.importorskip("torch")
    from embedder.evaluate.mteb_adapter import MTEBEncoder, local_task

    rng = np.random.RandomState(5)
    vocab = [f"w{i}" for i in range(40)]
    records = []
    for _ in range(30):   # translations share some words with their source, so some are mined wrongly
        src = list(rng.choice(vocab, 4, replace=False))
        tgt = src[:2] + list(rng.choice(vocab, 2, replace=False))
        records.append({"sentence1": " ".join(src), "sentence2": " ".join(tgt)})
    d = tmp_path / "bitext"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = evaluate_task(HashingEncoder(64), load_task(d), dims=[64])["dims"]["64"]
    assert 0.2 < ours["accuracy"] < 1.0, "the task must be neither trivial nor hopeless"
    enc = HashingEncoder(64)
    theirs = local_task(d).evaluate(MTEBEncoder(encoder=enc), split="test", encode_kwargs={"batch_size": 8})
    got = theirs["default"]
    for name in ("accuracy", "precision", "recall", "f1"):
        assert got[name] == pytest.approx(ours[name], abs=1e-6), name
    assert {c["task"] for c in enc.calls} == {"sentence similarity"}
