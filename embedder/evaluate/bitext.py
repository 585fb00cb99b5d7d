"""Bitext mining (MTEB's BitextMining): each sentence1 finds its translation among all sentence2.

MTEB's scores: the nearest sentence2 by cosine is the prediction and row i's gold is sentence2
i; `accuracy`, and `precision`, `recall`, `f1` as scikit-learn's support-weighted averages over
the gold classes (MTEB's main score is `f1`). The same search read as retrieval (one relevant
document per query) adds `ndcg_at_10`, `recall_at_10` and `mrr_at_10`; `recall_at_1` is
`accuracy`.
"""
from __future__ import annotations

import numpy as np

from embedder.evaluate.search import exact_top_k


def weighted_precision_recall_f1(labels, predictions) -> dict[str, float]:
    """Support-weighted precision, recall and F1 over the classes in `labels` (a class predicted
    but never gold has weight 0; 0/0 counts 0), as `sklearn.metrics.*_score(average="weighted",
    zero_division=0)`."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    classes, gold_index = np.unique(labels, return_inverse=True)
    support = np.bincount(gold_index, minlength=len(classes)).astype(np.float64)
    pos = np.searchsorted(classes, predictions)
    known = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == predictions)
    predicted = np.bincount(pos[known], minlength=len(classes)).astype(np.float64)
    true_pos = np.bincount(gold_index[labels == predictions], minlength=len(classes)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = true_pos / support
        f1 = np.where(support + predicted > 0, 2 * true_pos / (support + predicted), 0.0)
    weights = support / support.sum()
    return {"precision": float(weights @ precision), "recall": float(weights @ recall), "f1": float(weights @ f1)}


def evaluate_bitext_mining(emb1: np.ndarray, emb2: np.ndarray, k: int = 10) -> dict[str, float]:
    """MTEB's bitext scores of aligned `[N, D]` unit rows (row i of `emb1` translates row i of
    `emb2`), plus the retrieval reading of the same nearest-neighbour search."""
    n = len(emb1)
    if n == 0 or len(emb2) != n:
        raise ValueError(f"bitext mining needs aligned, non-empty sides; got {len(emb1)} and {len(emb2)} rows")
    _, idx = exact_top_k(np.asarray(emb1, np.float32), np.asarray(emb2, np.float32), min(k, n))
    return bitext_scores(idx, k)


def bitext_scores(ranked: np.ndarray, k: int = 10) -> dict[str, float]:
    """Bitext scores of `ranked[i]`: sentence2 indices, best first, found for sentence1 i (any
    search: embeddings or BM25); row i's gold is i."""
    idx = np.asarray(ranked)[:, :k]
    gold = np.arange(len(idx))
    hit = idx == gold[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    found = rank >= 0
    position = np.where(found, rank, 0) + 1.0  # 1-based; unused where not found
    out = {"accuracy": float(np.mean(idx[:, 0] == gold))}
    out.update(weighted_precision_recall_f1(gold, idx[:, 0]))
    out["recall_at_1"] = out["accuracy"]
    out[f"ndcg_at_{k}"] = float(np.mean(np.where(found, 1.0 / np.log2(position + 1.0), 0.0)))
    out[f"recall_at_{k}"] = float(np.mean(found))
    out[f"mrr_at_{k}"] = float(np.mean(np.where(found, 1.0 / position, 0.0)))
    return out
