"""Post-training quantisation of any saved model into a quantised parameter export (integer
weights and their scales on disk, int4 packed two a byte), read back by the model store as the
float model it encodes. The arithmetic and the schemes are `embedder.model.quant`'s."""
from __future__ import annotations

import copy
import pathlib

import numpy as np

from embedder.checkpoint import PARAMS_DIR, save_params
from embedder.model.quant import SCHEMES, dequantize_params, quantize_params, to_stored
from embedder.model_store import QUANTIZATION_KEY, load_model

__all__ = ["SCHEMES", "directory_bytes", "ptq_params", "quantize_model"]


def directory_bytes(path) -> int:
    """Bytes of the files under `path` (a file: its size)."""
    path = pathlib.Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ptq_params(params, scheme: str, block: int = 32, dtype=np.float32):
    """Post-training quantisation in memory: `params` with every leaf the scheme quantises
    replaced by its dequantised integers (what a quantised export of them loads as)."""
    quantized, table = quantize_params(params, scheme, block)
    return dequantize_params(quantized, table, dtype)


def quantize_model(src, dst, *, scheme: str | None = None, block: int | None = None,
                   overwrite: bool = False) -> dict:
    """Writes the quantised export of the saved model `src` to `dst` and returns a report
    (`scheme`, `block`, `leaves`, `bytes_float`: the params as float32, `bytes_stored`: the
    stored arrays before the checkpoint's compression, `bytes_on_disk`: of `dst/params/`,
    `bytes_source`: of the source's files when it is one directory or file).

    `scheme` / `block` default to the model's own QAT setting (`model.quant_scheme` /
    `quant_block`); a model trained without one needs `scheme`. The export's model runs the
    dequantised weights as they are (`quant_scheme` ""): they already lie on the grid."""
    params, spec = load_model(src)
    model = dict(spec["model"])
    scheme = scheme or model.get("quant_scheme") or ""
    if not scheme:
        raise ValueError(f"{src} was not trained with quantisation (model.quant_scheme is empty): "
                         f"pass --scheme {'|'.join(SCHEMES)}")
    block = int(model.get("quant_block", 32) if block is None else block)
    quantized, table = quantize_params(params, scheme, block)
    spec = copy.deepcopy(spec)
    spec["model"] = dict(model, quant_scheme="")
    spec[QUANTIZATION_KEY] = {"scheme": scheme, "block": block, "source": str(src), "leaves": table}
    stored = to_stored(quantized, table)
    out = save_params(dst, stored, spec, overwrite=overwrite)
    src_path = pathlib.Path(src)
    return {"scheme": scheme, "block": block, "leaves": len(table),
            "bytes_float": int(sum(np.asarray(v).size * 4 for v in _leaves(params))),
            "bytes_stored": int(sum(np.asarray(v).nbytes for v in _leaves(stored))),
            "bytes_on_disk": directory_bytes(out / PARAMS_DIR),
            "bytes_source": directory_bytes(src_path) if src_path.exists() else None,
            "out": str(out)}


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree

