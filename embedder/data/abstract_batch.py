"""The abstract global batch of a train config (`ArraySpec`s, nothing read or allocated): what
`--compile_only` compiles the step for, padded or packed at the longest lengths the config allows."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from embedder.data.batch_schema import PACKED_INPUTS, PADDED_INPUTS
from embedder.data.packing import packed_rows, rows_needed


class ArraySpec(NamedTuple):
    """Shape and dtype of one batch entry (what `jax.ShapeDtypeStruct(spec.shape, spec.dtype)` takes)."""
    shape: tuple[int, ...]
    dtype: Any


def global_batch_shapes(config, row_multiple: int = 8) -> dict[str, ArraySpec]:
    """The global batch of a train config at the longest lengths its data config allows; with
    `data.packing`, packed: the rows (a multiple of `row_multiple`) that max-length texts fill."""
    d = config.data
    b, lq, ld, k = int(config.batch_size), int(d.query_max_length), int(d.document_max_length), int(d.num_negatives)
    if k < 0:
        raise ValueError(f"data.num_negatives={k} counts the records' negatives when the data is prepared, "
                         "which compiling alone does not do; pass --config.data.num_negatives=K")
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
    if d.get("teacher", ""):   # the teacher entries the signals join (embedder.distill.signals)
        from embedder.distill.signals import read_manifest

        manifest = read_manifest(d.teacher)
        f32, width = np.dtype(np.float32), int(manifest["width"])
        shapes["teacher_valid"] = ((b,), f32)
        if manifest["store"] in ("embeddings", "both"):
            shapes.update({"teacher_query": ((b, width), f32), "teacher_positive": ((b, width), f32)})
            if k:
                shapes["teacher_negative"] = ((b, k, width), f32)
        if manifest["store"] in ("scores", "both"):
            shapes["teacher_scores"] = ((b, 1 + k), f32)
    if d.get("packing", False):
        shapes = packed_batch_shapes(shapes, query_length=lq, document_length=ld, row_multiple=row_multiple)
    return {name: ArraySpec(tuple(shape), dtype) for name, (shape, dtype) in shapes.items()}


def packed_batch_shapes(padded: Mapping[str, tuple], *, query_length: int, document_length: int,
                        row_multiple: int) -> dict[str, tuple]:
    """The `{name: (shape, dtype)}` of the packed form (`pack_batch`) of a padded batch's, its
    sequences at `query_length` / `document_length` tokens (the max lengths give the rows a batch
    of longest texts fills; shorter texts usually need fewer)."""
    b = padded["query_ids"][0][0]
    k = padded["negative_ids"][0][1] if "negative_ids" in padded else 0
    row_length = max(query_length, document_length)
    rows = packed_rows(rows_needed([query_length] * b + [document_length] * (b * (1 + k)), row_length),
                       row_multiple)
    out = {name: v for name, v in padded.items() if name not in PADDED_INPUTS}
    out.update({name: ((rows, row_length), np.dtype(np.int32)) for name in PACKED_INPUTS})
    out.setdefault("negatives_valid", ((b, k), np.dtype(bool)))
    return out
