"""Sequence packing: many token sequences in few fixed-length rows, without padding between them
(best-fit decreasing); the encoder attends and pools within each sequence (ARCHITECTURE.md "Batches")."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from embedder.data.batch_schema import PACKED_INPUTS, PADDED_INPUTS


def packed_rows(needed: int, row_multiple: int = 8, steps_per_octave: int = 16) -> int:
    """`needed` rounded up to a multiple of `row_multiple` and of 1/`steps_per_octave` of its
    octave (largest power of two <= `needed`): 131 -> 136, 1000 -> 1024, 5 -> 8."""
    if needed < 0 or row_multiple < 1 or steps_per_octave < 1:
        raise ValueError(f"packed_rows(needed={needed}, row_multiple={row_multiple}, "
                         f"steps_per_octave={steps_per_octave}): need needed >= 0 and the rest >= 1")
    octave = 1 << (needed.bit_length() - 1) if needed else 1
    step = max(row_multiple, octave // steps_per_octave)
    step = -(-step // row_multiple) * row_multiple
    return max(-(-needed // step) * step, row_multiple)


def assign_rows(lengths: Sequence[int], row_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: `(row, start)` of each sequence, rows numbered from 0 in the order
    they are opened. A sequence goes to the row with the least room that still fits it.

    Empty sequences take no room: they get row 0, start 0 and own no token (they pool to
    zeros, as an all-padding row does unpacked). O(N * row_length)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"assign_rows: lengths must be a flat list, got shape {lengths.shape}")
    too_long = np.flatnonzero(lengths > row_length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"sequence {i} has {int(lengths[i])} tokens > row length {row_length}; "
                         "truncate when encoding (max_length) or pack into longer rows")
    if row_length < 1:
        raise ValueError(f"row_length must be >= 1, got {row_length}")
    rows_by_room: list[list[int]] = [[] for _ in range(row_length + 1)]  # room -> open rows
    room: list[int] = []
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    # Longest first; ties keep the input order (stable), so packing is deterministic.
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        if n == 0:
            continue
        fit = next((r for r in range(n, row_length + 1) if rows_by_room[r]), None)
        if fit is None:
            r_index = len(room)
            room.append(row_length)
        else:
            r_index = rows_by_room[fit].pop()
        row[i], start[i] = r_index, row_length - room[r_index]
        room[r_index] -= n
        rows_by_room[room[r_index]].append(r_index)
    return row, start


def rows_needed(lengths: Sequence[int], row_length: int) -> int:
    """How many rows best-fit decreasing (`assign_rows`) packs `lengths` into (0 when all are empty)."""
    row, _ = assign_rows(lengths, row_length)
    return _rows_used(row, lengths)


def _rows_used(row: np.ndarray, lengths) -> int:
    used = row[np.asarray(lengths) > 0]
    return int(used.max()) + 1 if used.size else 0


def pack_sequences(seqs: Sequence[Sequence[int]], row_length: int, pad_id: int, *,
                   rows: int | None = None, row_multiple: int = 8) -> dict[str, np.ndarray]:
    """Packs `seqs` (lists of token ids, each <= `row_length`) into `[R, row_length]` int32 arrays:
    `ids` (`pad_id` where no sequence is), `sequence_ids` (the index in `seqs` of the sequence each
    token belongs to, -1 on padding) and `positions` (within its sequence, 0 on padding).

    `rows`: the row count to pad to (an error if the sequences need more); default
    `packed_rows(needed, row_multiple)`: at most 1/16 more rows than needed, so a training job
    compiles for few shapes. E.g. 64 Debian triples cut at 64 tokens hold 8,313 real tokens in
    10,240 padded slots, and fill 131 packed rows of 64 (8,384 slots).
    """
    lengths = [len(s) for s in seqs]
    row, start = assign_rows(lengths, row_length)
    needed = _rows_used(row, lengths)
    if rows is None:
        rows = packed_rows(needed, row_multiple)
    elif rows < needed:
        raise ValueError(f"pack_sequences: the {len(seqs)} sequences ({sum(lengths)} tokens) need "
                         f"{needed} rows of {row_length}; rows={rows} is too few")
    ids = np.full((rows, row_length), pad_id, np.int32)
    sequence_ids = np.full((rows, row_length), -1, np.int32)
    positions = np.zeros((rows, row_length), np.int32)
    for i, s in enumerate(seqs):
        n = lengths[i]
        if n:
            r, b = row[i], start[i]
            ids[r, b:b + n] = s
            sequence_ids[r, b:b + n] = i
            positions[r, b:b + n] = np.arange(n)
    return {"ids": ids, "sequence_ids": sequence_ids, "positions": positions}


def pack_batch(batch: dict[str, np.ndarray], pad_id: int, *, row_length: int | None = None,
               rows: int | None = None, row_multiple: int = 8) -> dict[str, np.ndarray]:
    """A padded training batch (`query_*`, `positive_*` `[B, L]`, `negative_*` `[B, K, L]`, see
    ARCHITECTURE.md) as a packed one: `packed_ids`, `packed_sequence_ids`, `packed_positions`
    `[R, row_length]` numbering queries `0..B-1`, positives `B..2B-1`, negatives
    `2B + b*K + k` (the order `embedder.train.step.embed_batch` splits them in). Every other
    entry is kept; `negatives_valid` (`[B, K]`, K may be 0) is added when missing, since it
    carries B and K. A sequence is the tokens its mask marks; `row_length` defaults to the
    longest padded length; `rows` (the row count, e.g. one shared by several hosts) and
    `row_multiple` are `pack_sequences`'s."""
    b = batch["query_ids"].shape[0]
    groups = [(batch["query_ids"], batch["query_mask"]), (batch["positive_ids"], batch["positive_mask"])]
    k = 0
    if "negative_ids" in batch:
        neg_ids = batch["negative_ids"]
        k = neg_ids.shape[1]
        groups.append((neg_ids.reshape(b * k, -1), batch["negative_mask"].reshape(b * k, -1)))
    seqs = [row[m.astype(bool)].tolist() for ids, mask in groups for row, m in zip(ids, mask)]
    if row_length is None:
        row_length = max(ids.shape[-1] for ids, _ in groups)
    packed = pack_sequences(seqs, row_length, pad_id, rows=rows, row_multiple=row_multiple)
    out = {key: v for key, v in batch.items() if key not in PADDED_INPUTS}
    out.update(zip(PACKED_INPUTS, (packed["ids"], packed["sequence_ids"], packed["positions"])))
    out.setdefault("negatives_valid", np.ones((b, k), bool))
    return out
