"""Rank candidate passages with an LLM twice (graded relevance, query likelihood) and fuse by RRF."""
from __future__ import annotations

from typing import Sequence

RRF_K = 60  # the constant from Cormack et al. 2009


def ranks_descending(scores: Sequence[float], tiebreak: Sequence[int]) -> list[int]:
    """1-based rank of each item when sorted by score (high first), ties by `tiebreak` (low first)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], tiebreak[i]))
    ranks = [0] * len(scores)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[float]:
    """Fused score per item: sum over rankings of 1 / (k + rank)."""
    n = len(rankings[0])
    if any(len(r) != n for r in rankings):
        raise ValueError("reciprocal_rank_fusion: all rankings must cover the same items")
    return [sum(1.0 / (k + r[i]) for r in rankings) for i in range(n)]
