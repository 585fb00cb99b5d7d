"""Exact top-k dot-product search in blocks, so no full queries x corpus matrix is held."""
from __future__ import annotations

import numpy as np


def _keep_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, where columns are in ascending index order and equal
    scores prefer the lower index, exactly (so results never depend on the blocking).
    Output columns stay in ascending index order."""
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    above = scores > kth
    ties = scores == kth
    # Ties at the k-th score fill the remaining places lowest index first.
    room = k - above.sum(axis=1, keepdims=True)
    keep = above | (ties & (np.cumsum(ties, axis=1) <= room))
    rows = scores.shape[0]
    return scores[keep].reshape(rows, k), indices[keep].reshape(rows, k)


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, *, query_block: int = 512,
                corpus_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows by dot product for each query row.

    Returns `(scores, indices)`, each `[Q, min(k, N)]`, best first; equal scores keep
    the lower corpus index first, whatever the block sizes. Memory is
    `query_block x (corpus_block + k)` floats.
    """
    queries = np.asarray(queries, dtype=np.float32)
    corpus = np.asarray(corpus, dtype=np.float32)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"exact_top_k: need [Q, D] queries and [N, D] corpus with the same D, got {queries.shape} and {corpus.shape}")
    if k < 1:
        raise ValueError(f"exact_top_k: k must be >= 1, got {k}")
    if query_block < 1 or corpus_block < 1:
        raise ValueError(f"exact_top_k: query_block={query_block} and corpus_block={corpus_block} must be >= 1")
    n = corpus.shape[0]
    k = min(k, n)
    if k < 1:
        raise ValueError("exact_top_k: the corpus is empty")
    all_scores = np.empty((queries.shape[0], k), np.float32)
    all_indices = np.empty((queries.shape[0], k), np.int64)
    for q0 in range(0, queries.shape[0], query_block):
        q = queries[q0:q0 + query_block]
        best_scores = np.full((q.shape[0], 0), -np.inf, np.float32)
        best_indices = np.zeros((q.shape[0], 0), np.int64)
        for c0 in range(0, n, corpus_block):
            block = q @ corpus[c0:c0 + corpus_block].T
            idx = np.broadcast_to(np.arange(c0, c0 + block.shape[1]), block.shape)
            # The running best (all from earlier blocks, ascending index) then this block:
            # candidates stay in ascending index order, which the tie rule relies on.
            best_scores = np.concatenate([best_scores, block], axis=1)
            best_indices = np.concatenate([best_indices, idx], axis=1)
            if best_scores.shape[1] > k:
                best_scores, best_indices = _keep_k(best_scores, best_indices, k)
        order = np.lexsort((best_indices, -best_scores), axis=1)
        all_scores[q0:q0 + query_block] = np.take_along_axis(best_scores, order, axis=1)
        all_indices[q0:q0 + query_block] = np.take_along_axis(best_indices, order, axis=1)
    return all_scores, all_indices
