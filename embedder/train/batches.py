"""Batch-layout helpers for the train loop and `--compile_only`: token counts of padded and
packed batches (ARCHITECTURE.md "Batches"), and the shapes of a packed global batch."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from embedder.data.packing import PADDED_INPUTS, packed_rows, rows_needed
from embedder.train.step import PACKED_KEYS, is_packed


def token_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(real tokens, token slots the encoder computes) of a host batch, padded or packed.

    Packed: real = `packed_sequence_ids >= 0`, slots = `packed_ids.size`. Padded: real = the
    masks' ones, slots = the masks' sizes. Empty negative slots (prompt-only sequences,
    `negatives_valid=False`) are encoded, so they count in both layouts."""
    if is_packed(batch):
        return int(np.count_nonzero(np.asarray(batch["packed_sequence_ids"]) >= 0)), int(batch["packed_ids"].size)
    real = slots = 0
    for name in ("query_mask", "positive_mask", "negative_mask"):
        if name in batch:
            mask = np.asarray(batch[name])
            real, slots = real + int(np.count_nonzero(mask)), slots + int(mask.size)
    return real, slots


def packed_batch_shapes(padded: Mapping[str, tuple], *, query_length: int, document_length: int,
                        row_multiple: int) -> dict[str, tuple]:
    """The `{name: (shape, dtype)}` of the packed form (`pack_batch`) of a padded global batch's
    `{name: (shape, dtype)}`, its sequences at `query_length` / `document_length` tokens (the max
    lengths give the rows a batch of longest texts fills; shorter texts usually need fewer)."""
    import jax.numpy as jnp

    b = padded["query_ids"][0][0]
    k = padded["negative_ids"][0][1] if "negative_ids" in padded else 0
    row_length = max(query_length, document_length)
    rows = packed_rows(rows_needed([query_length] * b + [document_length] * (b * (1 + k)), row_length),
                       row_multiple)
    out = {name: v for name, v in padded.items() if name not in PADDED_INPUTS}
    out.update({name: ((rows, row_length), jnp.int32) for name in PACKED_KEYS})
    out.setdefault("negatives_valid", ((b, k), jnp.bool_))
    return out
