"""The train batch schema (ARCHITECTURE.md "Batches"): key names, padded or packed, abstract
global batches and token counts, for the pipeline, the train step and `--compile_only`."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

# The encoder inputs of a padded batch (`negative_*` only when K > 0), which a packed batch replaces.
PADDED_INPUTS = ("query_ids", "query_mask", "positive_ids", "positive_mask", "negative_ids", "negative_mask")
# The encoder inputs of a packed batch, all [R, L] int32 (`embedder.data.packing.pack_batch`).
PACKED_INPUTS = ("packed_ids", "packed_sequence_ids", "packed_positions")
# Token-id entries whose leading axes count sequences and whose last axis is their length.
TOKEN_IDS = ("query_ids", "positive_ids", "negative_ids", "packed_ids")
# The text-identity hashes `loss.mask_duplicates` compares ([B, 2] / [B, K, 2] uint32).
TEXT_HASHES = ("query_hash", "positive_hash", "negative_hash")


class ArraySpec(NamedTuple):
    """Shape and dtype of one batch entry (what `jax.ShapeDtypeStruct(spec.shape, spec.dtype)` takes)."""
    shape: tuple[int, ...]
    dtype: Any


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether `batch` (arrays or `ArraySpec`s) holds packed rows instead of padded ones."""
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


def global_batch_shapes(config, row_multiple: int = 8) -> dict[str, ArraySpec]:
    """The global batch of a train config at the longest lengths its data config allows; with
    `data.packing`, packed: the rows (a multiple of `row_multiple`) that max-length texts fill."""
    d = config.data
    b, lq, ld, k = int(config.batch_size), int(d.query_max_length), int(d.document_max_length), int(d.num_negatives)
    i32, u32 = np.dtype(np.int32), np.dtype(np.uint32)
    shapes = {
        "query_ids": ((b, lq), i32), "query_mask": ((b, lq), i32),
        "positive_ids": ((b, ld), i32), "positive_mask": ((b, ld), i32),
        "query_hash": ((b, 2), u32), "positive_hash": ((b, 2), u32),
        "dataset": ((b,), i32),
    }
    if k:
        shapes.update({
            "negative_ids": ((b, k, ld), i32), "negative_mask": ((b, k, ld), i32),
            "negatives_valid": ((b, k), np.dtype(bool)), "negative_hash": ((b, k, 2), u32),
        })
    if d.get("packing", False):
        shapes = packed_batch_shapes(shapes, query_length=lq, document_length=ld, row_multiple=row_multiple)
    return {name: ArraySpec(tuple(shape), dtype) for name, (shape, dtype) in shapes.items()}


def packed_batch_shapes(padded: Mapping[str, tuple], *, query_length: int, document_length: int,
                        row_multiple: int) -> dict[str, tuple]:
    """The `{name: (shape, dtype)}` of the packed form (`pack_batch`) of a padded batch's, its
    sequences at `query_length` / `document_length` tokens (the max lengths give the rows a batch
    of longest texts fills; shorter texts usually need fewer)."""
    # Imported here, not at the top: packing imports this module's key names.
    from embedder.data.packing import packed_rows, rows_needed

    b = padded["query_ids"][0][0]
    k = padded["negative_ids"][0][1] if "negative_ids" in padded else 0
    row_length = max(query_length, document_length)
    rows = packed_rows(rows_needed([query_length] * b + [document_length] * (b * (1 + k)), row_length),
                       row_multiple)
    out = {name: v for name, v in padded.items() if name not in PADDED_INPUTS}
    out.update({name: ((rows, row_length), np.dtype(np.int32)) for name in PACKED_INPUTS})
    out.setdefault("negatives_valid", ((b, k), np.dtype(bool)))
    return out
