"""Deterministic, index-based mixture schedule: which dataset (or how many rows of each) a step uses.

Every host computes the same draws from (seed, step), so all hosts agree without talking,
and the whole schedule state is the step counter.
"""
from __future__ import annotations

import numpy as np

CHUNK = 1024  # steps drawn at once; replaying a resumed run costs one draw per chunk
_SALT = 0x6D697874  # separates these streams from other uses of the same seed


class MixtureSchedule:
    """`homogeneous`: one dataset per global batch, drawn by weight. `mixed`: each host's rows
    are split across datasets by a multinomial draw (pre-finetuning style)."""

    def __init__(self, weights, seed: int, mode: str, host_batch: int, process_index: int, process_count: int):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"mixture weights {list(weights)} must be finite, >= 0, with a positive sum")
        if mode not in ("homogeneous", "mixed"):
            raise ValueError(f"data_config.mode={mode!r} is unknown; use 'homogeneous' or 'mixed'")
        self.probs = w / w.sum()
        self.seed, self.mode = int(seed), mode
        self.host_batch, self.process_index, self.process_count = host_batch, process_index, process_count
        self._cache = (None, None)

    def _chunk(self, c: int) -> np.ndarray:
        """Per-step rows taken from each dataset by THIS host in chunk c: [CHUNK, D] int64."""
        if self._cache[0] == c:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, _SALT, c])
        d = len(self.probs)
        if self.mode == "homogeneous":
            choice = rng.choice(d, size=CHUNK, p=self.probs)
            rows = np.zeros((CHUNK, d), np.int64)
            rows[np.arange(CHUNK), choice] = self.host_batch
        else:
            # Draw every host's split (identical on all hosts) and keep ours.
            rows = rng.multinomial(self.host_batch, self.probs, size=(CHUNK, self.process_count))
            rows = rows[:, self.process_index]
        self._cache = (c, rows)
        return rows

    def rows_at(self, step: int) -> np.ndarray:
        """Rows per dataset that this host takes at `step`: [D]."""
        return self._chunk(step // CHUNK)[step % CHUNK]

    def consumed_before(self, step: int) -> np.ndarray:
        """Rows per dataset this host consumed in steps [0, step): [D]."""
        total = np.zeros(len(self.probs), np.int64)
        full, rest = divmod(step, CHUNK)
        for c in range(full):
            total += self._chunk(c).sum(axis=0)
        if rest:
            total += self._chunk(full)[:rest].sum(axis=0)
        return total
