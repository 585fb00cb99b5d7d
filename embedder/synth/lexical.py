"""Lexical retrieval: the BM25 tokenizer, top-k BM25 search (`bm25s`) and bag-of-words cosine.

One tokenizer serves BM25 hard-negative mining and the BM25 baseline of
embedder.evaluate.bm25_baseline: lower-cased `\\w+` words, plus character bigrams of every
run of Han, kana or Hangul (scripts written without spaces).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence

import numpy as np

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]+")
_WORD = re.compile(r"\w+")
EMPTY = "<empty>"  # stands in for a text with no tokens, so bm25s indexes every document


class MissingBM25(ImportError):
    """bm25s is not installed."""


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words; runs of Han, kana or Hangul also as character bigrams."""
    tokens = _WORD.findall(text.lower())
    for run in _CJK.findall(text):
        tokens += [run[i:i + 2] for i in range(max(1, len(run) - 1))]
    return tokens


def require_bm25s():
    """The bm25s module, or MissingBM25 naming the install command."""
    try:
        import bm25s
    except ImportError as err:
        raise MissingBM25("BM25 retrieval needs bm25s: pip install bm25s "
                          "(or the synth extra: pip install -e '.[synth]')") from err
    return bm25s


class BM25Index:
    """A bm25s index over token lists (bm25s defaults: Lucene BM25, k1=1.5, b=0.75)."""

    def __init__(self, doc_tokens: Sequence[Sequence[str]]):
        bm25s = require_bm25s()
        self.num_docs = len(doc_tokens)
        self.retriever = bm25s.BM25()
        self.retriever.index([list(t) or [EMPTY] for t in doc_tokens], show_progress=False)

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every document for one query ([D] float32; a repeated query token counts again)."""
        ids = self.retriever.get_tokens_ids(list(query_tokens))
        if not ids:
            return np.zeros(self.num_docs, np.float32)
        return np.asarray(self.retriever.get_scores_from_ids(ids), np.float32)

    def top_k(self, query_tokens: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, doc indices) of the best k documents, best first, equal scores lower index first.

        Only documents that share a token with the query (score > 0) are retrieved, so fewer
        than k may come back."""
        s = self.scores(query_tokens)
        hit = np.flatnonzero(s > 0)
        if hit.size > k:
            kth = -np.partition(-s[hit], k - 1)[k - 1]
            hit = hit[s[hit] >= kth]  # every tie at the k-th score, cut after sorting
        order = np.lexsort((hit, -s[hit]))[:k]
        return s[hit[order]], hit[order].astype(np.int64)


def bm25_top_k(queries: Sequence[Sequence[str]], docs: Sequence[Sequence[str]], k: int
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """BM25Index(docs).top_k(q, k) for every query token list q."""
    index = BM25Index(docs)
    return [index.top_k(q, k) for q in queries]


def bag_of_words_cosine(a: collections.Counter, b: collections.Counter) -> float:
    """Cosine of two token-count vectors (0 when either is empty)."""
    if len(a) > len(b):
        a, b = b, a
    dot = sum(n * b[t] for t, n in a.items() if t in b)
    if not dot:
        return 0.0
    return dot / math.sqrt(sum(n * n for n in a.values()) * sum(n * n for n in b.values()))
