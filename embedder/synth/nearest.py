"""Top-k inner-product search over normalised embeddings: exact chunked matmuls, or faiss when installed."""
from __future__ import annotations

import numpy as np


def exact_top_k(queries: np.ndarray, docs: np.ndarray, k: int, *, query_chunk: int = 1024,
                doc_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(scores, indices), each [Q, k], best first, by exact inner product.

    Works block by block so memory stays O(query_chunk * doc_chunk), never Q x N.
    """
    queries = np.asarray(queries, dtype=np.float32)
    docs = np.asarray(docs, dtype=np.float32)
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise ValueError(f"top-k needs [Q, D] queries and [N, D] docs, got {queries.shape} and {docs.shape}")
    k = min(k, docs.shape[0])
    if k <= 0:
        raise ValueError(f"top-k needs k >= 1 and a non-empty corpus (k={k}, corpus size {docs.shape[0]})")
    out_scores = np.empty((queries.shape[0], k), np.float32)
    out_index = np.empty((queries.shape[0], k), np.int64)
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk]
        best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
        best_i = np.zeros((q.shape[0], 0), np.int64)
        for d0 in range(0, docs.shape[0], doc_chunk):
            s = q @ docs[d0:d0 + doc_chunk].T
            kk = min(k, s.shape[1])
            kth = -np.partition(-s, kk - 1, axis=1)[:, kk - 1]
            rows_s, rows_i = [], []
            for r in range(s.shape[0]):
                # Everything tied with the k-th score survives, so ties are broken by the
                # lower document index below and results do not depend on chunking.
                keep = np.flatnonzero(s[r] >= kth[r])
                cs = np.concatenate([best_s[r], s[r, keep]])
                ci = np.concatenate([best_i[r], keep + d0])
                order = np.lexsort((ci, -cs))[:k]
                rows_s.append(cs[order])
                rows_i.append(ci[order])
            best_s, best_i = np.stack(rows_s), np.stack(rows_i)
        out_scores[q0:q0 + q.shape[0]] = best_s
        out_index[q0:q0 + q.shape[0]] = best_i
    return out_scores, out_index


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as exact_top_k, through a faiss flat inner-product index (multi-threaded, BLAS)."""
    import faiss

    docs = np.ascontiguousarray(docs, dtype=np.float32)
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    scores, indices = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, docs.shape[0]))
    return scores, indices.astype(np.int64)


def top_k(queries: np.ndarray, docs: np.ndarray, k: int, index: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """`index`: "exact", "faiss", or "auto" (faiss when installed and the corpus exceeds 100k documents)."""
    if index == "faiss" or (index == "auto" and docs.shape[0] > 100_000 and faiss_available()):
        if not faiss_available():
            raise ValueError("--index faiss: faiss is not installed (pip install faiss-cpu) - or use --index exact")
        return faiss_top_k(queries, docs, k)
    if index not in ("exact", "auto", "faiss"):
        raise ValueError(f"--index {index!r}: choose exact, faiss or auto")
    return exact_top_k(queries, docs, k)
