"""Scores of text pairs by cosine: STS (Spearman), pair classification (AP), reranking (MAP, MRR@10)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score


def pair_cosines(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two `[N, D]` arrays of unit rows."""
    return np.sum(np.asarray(emb1, np.float32) * np.asarray(emb2, np.float32), axis=1)


def evaluate_sts(emb1: np.ndarray, emb2: np.ndarray, gold: Sequence[float]) -> dict[str, float]:
    """`spearman` and `pearson` correlation between cosine similarities and gold scores."""
    cos = pair_cosines(emb1, emb2)
    return {"spearman": float(spearmanr(cos, gold).statistic), "pearson": float(pearsonr(cos, gold).statistic)}


def evaluate_pair_classification(emb1: np.ndarray, emb2: np.ndarray, labels: Sequence[float]) -> dict[str, float]:
    """`ap`: average precision of cosine similarity for the positive (label 1) pairs; plus
    `accuracy`: the best accuracy over cosine thresholds (MTEB's cosine_accuracy)."""
    y = np.asarray(labels).astype(int)
    if set(np.unique(y).tolist()) - {0, 1}:
        raise ValueError(f"pair classification labels must be 0 or 1, got {sorted(set(y.tolist()))}")
    cos = pair_cosines(emb1, emb2)
    order = np.argsort(-cos, kind="stable")
    ys, cs = y[order], cos[order]
    # Threshold between consecutive distinct scores: predict 1 for the top i pairs.
    positives_above = np.concatenate([[0], np.cumsum(ys)])
    negatives_below = (len(y) - y.sum()) - np.concatenate([[0], np.cumsum(1 - ys)])
    valid = np.concatenate([[True], np.r_[cs[1:] != cs[:-1], True]])
    accuracy = float(np.max((positives_above + negatives_below)[valid]) / len(y))
    return {"ap": float(average_precision_score(y, cos)), "accuracy": accuracy}


def evaluate_reranking(query_emb: np.ndarray, candidate_emb: Sequence[np.ndarray],
                       candidate_relevant: Sequence[np.ndarray]) -> dict[str, float]:
    """`map` and `mrr_at_10` of each query's candidates ranked by cosine (queries with no
    positive or no negative are skipped, as in MTEB)."""
    aps, rrs = [], []
    for q, cands, rel in zip(query_emb, candidate_emb, candidate_relevant):
        rel = np.asarray(rel, bool)
        if rel.all() or not rel.any():
            continue
        scores = cands @ q
        ranked = rel[np.argsort(-scores, kind="stable")]
        hits = np.cumsum(ranked)
        ranks = np.flatnonzero(ranked) + 1
        aps.append(float(np.mean(hits[ranked] / ranks)))
        rrs.append(1.0 / ranks[0] if ranks[0] <= 10 else 0.0)
    if not aps:
        raise ValueError("reranking: no query has both a positive and a negative candidate")
    return {"map": float(np.mean(aps)), "mrr_at_10": float(np.mean(rrs))}
