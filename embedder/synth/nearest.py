"""Top-k inner-product search for mining: exact blocked matmuls (`embedder.evaluate.search`), or faiss."""
from __future__ import annotations

import numpy as np

from embedder.evaluate.search import exact_top_k


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_top_k(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as exact_top_k, through a faiss flat inner-product index (multi-threaded, BLAS)."""
    import faiss  # optional (faiss-cpu), not a dependency

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
