"""The train batch schema (ARCHITECTURE.md "Batches"): key names, padded or packed, and token
counts, for the pipeline, the packer, the train step and the loop."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# The encoder inputs of a padded batch (`negative_*` only when K > 0), which a packed batch replaces.
PADDED_INPUTS = ("query_ids", "query_mask", "positive_ids", "positive_mask", "negative_ids", "negative_mask")
# The encoder inputs of a packed batch, all [R, L] int32 (`embedder.data.packing.pack_batch`).
PACKED_INPUTS = ("packed_ids", "packed_sequence_ids", "packed_positions")
# Token-id entries whose leading axes count sequences and whose last axis is their length.
TOKEN_IDS = ("query_ids", "positive_ids", "negative_ids", "packed_ids")
# The text-identity hashes `loss.mask_duplicates` compares ([B, 2] / [B, K, 2] uint32).
TEXT_HASHES = ("query_hash", "positive_hash", "negative_hash")
# A teacher's signals joined to each row (`data.teacher`; `embedder.distill.signals`), float32:
# teacher_query / teacher_positive [B, Dt], teacher_negative [B, K, Dt], teacher_scores [B, 1 + K],
# teacher_valid [B]: 1 where the row's dataset is distilled, 0 (and zero signals) where it is not.
TEACHER_SIGNALS = ("teacher_query", "teacher_positive", "teacher_negative", "teacher_scores", "teacher_valid")


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether `batch` (arrays or `abstract_batch.ArraySpec`s) holds packed rows instead of padded ones."""
    return PACKED_INPUTS[0] in batch


def encoder_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries the encoder reads (what the gradient cache splits into chunks)."""
    names = PACKED_INPUTS if is_packed(batch) else PADDED_INPUTS
    return {name: batch[name] for name in names if name in batch}


def token_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(real tokens, token slots the encoder computes) of a host batch, padded or packed.

    Packed: real = `packed_sequence_ids >= 0`, slots = `packed_ids.size`. Padded: real = the
    masks' ones, slots = the masks' sizes. Empty negative slots (prompt-only sequences,
    `negatives_valid=False`) are encoded, so they count in both layouts."""
    if is_packed(batch):
        return int(np.count_nonzero(np.asarray(batch["packed_sequence_ids"]) >= 0)), int(batch["packed_ids"].size)
    real = slots = 0
    for name in PADDED_INPUTS[1::2]:
        if name in batch:
            mask = np.asarray(batch[name])
            real, slots = real + int(np.count_nonzero(mask)), slots + int(mask.size)
    return real, slots


def sequence_shapes(batch: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(number of sequences, padded length) of each token-id entry; packed rows count as
    sequences of the row length (the encoder computes whole rows, attention masked)."""
    return [(int(np.prod(batch[name].shape[:-1])), int(batch[name].shape[-1]))
            for name in TOKEN_IDS if name in batch]
