"""Deterministic, index-based mixture schedule: which dataset each row of a global batch comes from.

Every host computes the same draws from (seed, step) alone, never from its process index or
the process count, so all hosts agree without talking and the whole schedule state is the step.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1024  # steps drawn at once; replaying a resumed run costs one draw per chunk
_SALT = 0x6D697874  # separates these streams from other uses of the same seed
_ORDER_SALT = 0x6F726472  # the per-step row order of mixed batches


class MixtureSchedule:
    """`homogeneous`: one dataset per global batch, drawn by weight. `mixed`: the global batch's
    rows are split across datasets by a multinomial draw (pre-finetuning style), and their order
    in the batch is a seeded shuffle so every host's slice holds a mix."""

    def __init__(self, weights, seed: int, mode: str, batch_size: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights {list(weights)} must be finite, >= 0, with a positive sum")
        if mode not in ("homogeneous", "mixed"):
            raise ValueError(f"data_config.mode={mode!r} is unknown; use 'homogeneous' or 'mixed'")
        if int(batch_size) <= 0:
            raise ValueError(f"MixtureSchedule: batch_size={batch_size} must be positive")
        self.probs = w / w.sum()
        self.seed, self.mode, self.batch_size = int(seed), mode, int(batch_size)
        self._cache = (None, None)

    def _chunk(self, c: int) -> np.ndarray:
        """Per-step rows of the global batch taken from each dataset in chunk c: [CHUNK, D] int64."""
        if self._cache[0] == c:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, _SALT, c])
        d = len(self.probs)
        if self.mode == "homogeneous":
            choice = rng.choice(d, size=CHUNK, p=self.probs)
            rows = np.zeros((CHUNK, d), np.int64)
            rows[np.arange(CHUNK), choice] = self.batch_size
        else:
            rows = rng.multinomial(self.batch_size, self.probs, size=CHUNK).astype(np.int64)
        self._cache = (c, rows)
        return rows

    def rows_at(self, step: int) -> np.ndarray:
        """Rows of the global batch per dataset at `step`: [D], summing to batch_size."""
        return self._chunk(step // CHUNK)[step % CHUNK]

    def labels_at(self, step: int) -> np.ndarray:
        """Dataset index of every row of the global batch at `step`, in batch order: [batch_size]."""
        labels = np.repeat(np.arange(len(self.probs)), self.rows_at(step))
        if self.mode == "mixed":
            # Without the shuffle a host's slice would hold mostly one dataset; its own stream
            # (not the chunk's) keeps the per-step cost at one batch-sized permutation.
            labels = np.random.default_rng([self.seed, _ORDER_SALT, step]).permutation(labels)
        return labels

    def consumed_before(self, step: int) -> np.ndarray:
        """Rows per dataset that the global batches of steps [0, step) consumed: [D]."""
        total = np.zeros(len(self.probs), np.int64)
        full, rest = divmod(step, CHUNK)
        for c in range(full):
            total += self._chunk(c).sum(axis=0)
        if rest:
            total += self._chunk(full)[:rest].sum(axis=0)
        return total
