"""BM25 as a retrieval baseline on an evaluation task: the lexical row beside the models.

Scores retrieval and bitext-mining tasks (`embedder.evaluate.tasks.load_task`) with `bm25s`
(Lucene scoring, k1=1.5, b=0.75) over `embedder.synth.lexical.bm25_tokens`: lower-cased words,
runs of Han, kana or Hangul as character bigrams, no stemming. Other task types have no BM25
score (None).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from embedder.evaluate.bitext import bitext_scores
from embedder.evaluate.retrieval_metrics import mean_metrics
from embedder.synth.lexical import EMPTY, bm25_tokens, require_bm25s


def bm25_rank(queries: Sequence[str], docs: Sequence[str], k: int) -> np.ndarray:
    """[Q, min(k, D)] indices into `docs`, best first, for every query."""
    retriever = require_bm25s().BM25()
    retriever.index([bm25_tokens(d) or [EMPTY] for d in docs], show_progress=False)
    idx, _ = retriever.retrieve([bm25_tokens(q) or [EMPTY] for q in queries], k=min(k, len(docs)),
                                show_progress=False, n_threads=1)
    return np.asarray(idx)


def evaluate_bm25(task) -> dict | None:
    """Metrics of BM25 on a loaded task: retrieval gives the retrieval metrics (nDCG@10, R@10, ...)
    over the top 100; bitext mining gives MTEB's accuracy and nDCG@10 over the top 10; else None."""
    d = task.data
    if task.type == "bitext_mining":
        return bitext_scores(bm25_rank(d["sentence1"], d["sentence2"], 10))
    if task.type == "retrieval":
        idx = bm25_rank(d["query_texts"], d["corpus_texts"], 100)
        rankings = {q: [d["corpus_ids"][j] for j in row] for q, row in zip(d["query_ids"], idx)}
        return mean_metrics(rankings, {q: d["qrels"][q] for q in d["query_ids"]})
    return None
