"""Exact top-k dot-product search in blocks, so no full queries x corpus matrix is held."""
from __future__ import annotations

import numpy as np


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, *, query_block: int = 512,
                corpus_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows by dot product for each query row.

    Returns `(scores, indices)`, each `[Q, min(k, N)]`, best first; equal scores keep
    the lower corpus index first. Memory is `query_block x (corpus_block + k)` floats.
    """
    queries = np.asarray(queries, dtype=np.float32)
    corpus = np.asarray(corpus, dtype=np.float32)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"exact_top_k: need [Q, D] queries and [N, D] corpus with the same D, got {queries.shape} and {corpus.shape}")
    if k < 1:
        raise ValueError(f"exact_top_k: k must be >= 1, got {k}")
    n = corpus.shape[0]
    k = min(k, n)
    all_scores = np.empty((queries.shape[0], k), np.float32)
    all_indices = np.empty((queries.shape[0], k), np.int64)
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0:q0 + query_block]
        best_scores = np.full((q.shape[0], 0), -np.inf, np.float32)
        best_indices = np.zeros((q.shape[0], 0), np.int64)
        for c0 in range(0, n, corpus_block):
            block = q @ corpus[c0:c0 + corpus_block].T
            idx = np.broadcast_to(np.arange(c0, c0 + block.shape[1]), block.shape)
            # Candidates are the running best plus this block; keep the k best of them.
            cand_scores = np.concatenate([best_scores, block], axis=1)
            cand_indices = np.concatenate([best_indices, idx], axis=1)
            if cand_scores.shape[1] > k:
                part = np.argpartition(-cand_scores, k - 1, axis=1)[:, :k]
                cand_scores = np.take_along_axis(cand_scores, part, axis=1)
                cand_indices = np.take_along_axis(cand_indices, part, axis=1)
            best_scores, best_indices = cand_scores, cand_indices
        # Sort by score descending, then index ascending (argpartition breaks ties arbitrarily).
        order = np.lexsort((best_indices, -best_scores), axis=1)
        all_scores[q0:q0 + query_block] = np.take_along_axis(best_scores, order, axis=1)
        all_indices[q0:q0 + query_block] = np.take_along_axis(best_indices, order, axis=1)
    return all_scores, all_indices
