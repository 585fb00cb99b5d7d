"""Ranking metrics with trec_eval semantics: nDCG@k, Recall@k, MRR@k, MAP.

Gains are the qrels scores (linear, as trec_eval's ndcg_cut); a document is relevant
when its qrels score is >= 1. Metric names: `ndcg_at_10`, `recall_at_1`, `recall_at_10`,
`recall_at_100`, `mrr_at_10`, `map` (over the retrieved list, trec_eval's `map`).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def query_metrics(ranking: Sequence[str], judged: Mapping[str, int], *, ndcg_k: int = 10,
                  recall_ks: Sequence[int] = (1, 10, 100), mrr_k: int = 10) -> dict[str, float]:
    """Metrics of one ranked list of doc ids against its judgements {doc_id: score}."""
    relevant = {d for d, s in judged.items() if s >= 1}
    num_rel = len(relevant)
    out: dict[str, float] = {}
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking[:ndcg_k]) if judged.get(d, 0) > 0)
    ideal = sorted((s for s in judged.values() if s > 0), reverse=True)[:ndcg_k]
    idcg = sum(s / math.log2(i + 2) for i, s in enumerate(ideal))
    out[f"ndcg_at_{ndcg_k}"] = dcg / idcg if idcg > 0 else 0.0
    for k in recall_ks:
        hits = sum(1 for d in ranking[:k] if d in relevant)
        out[f"recall_at_{k}"] = hits / num_rel if num_rel else 0.0
    rr = 0.0
    for i, d in enumerate(ranking[:mrr_k]):
        if d in relevant:
            rr = 1.0 / (i + 1)
            break
    out[f"mrr_at_{mrr_k}"] = rr
    hits, precision_sum = 0, 0.0
    for i, d in enumerate(ranking):
        if d in relevant:
            hits += 1
            precision_sum += hits / (i + 1)
    out["map"] = precision_sum / num_rel if num_rel else 0.0
    return out


def mean_metrics(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]],
                 **kwargs) -> dict[str, float]:
    """Mean of `query_metrics` over every query of `qrels` (a query with no ranking scores 0)."""
    if not qrels:
        raise ValueError("mean_metrics: qrels is empty; nothing to evaluate")
    per_query = [query_metrics(rankings.get(qid, ()), judged, **kwargs) for qid, judged in qrels.items()]
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}
