"""Write any saved model as a folder that transformers and sentence-transformers load as-is
(`python -m embedder.convert to-hf SRC DST`)."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import struct
from typing import Iterable

import numpy as np

from embedder.convert.hf_config import config_to_hf
from embedder.convert.hf_mapping import params_to_hf
from embedder.convert.hf_tokenizer import write_tokenizer_files
from embedder.data.prompts import DEFAULT_TASK, Prompts
from embedder.data.tokenizer import _resolve_file
from embedder.model.config import ModelConfig
from embedder.model.quant import dequantize_params, quantize_params
from embedder.model_store import load_model

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                       "int32": "I32", "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
DEFAULT_MAX_SHARD_BYTES = 5 << 30
# sentence-transformers prompt names, EmbeddingGemma style: name -> our task string (None: document).
ST_PROMPT_TASKS = {
    "query": DEFAULT_TASK, "document": None,
    "BitextMining": "search result", "Clustering": "clustering", "Classification": "classification",
    "InstructionRetrieval": "code retrieval", "MultilabelClassification": "classification",
    "PairClassification": "sentence similarity", "Reranking": "search result",
    "Retrieval": "search result", "Retrieval-query": "search result", "Retrieval-document": None,
    "STS": "sentence similarity", "Summarization": "summarization",
}
_ST_MODULE = "sentence_transformers.base.modules"
_ST_TYPES = {"Transformer": f"{_ST_MODULE}.transformer.Transformer",
             "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
             "Dense": f"{_ST_MODULE}.dense.Dense", "Normalize": f"{_ST_MODULE}.normalize.Normalize"}
_EMBEDDING_IO = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}


def _raw_bytes(array: np.ndarray) -> memoryview:
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes arrays do not export a buffer themselves
        array = array.view(np.uint16)
    return memoryview(array).cast("B")


def write_safetensors(path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> int:
    """Writes `(name, array)` pairs to one safetensors file, one tensor at a time (only the header
    is built up front), so no second copy of the model is held in memory. Returns bytes written."""
    tensors = list(tensors)  # names and (lazy) views only
    header, offset = {}, 0
    for name, array in tensors:
        dtype = _SAFETENSORS_DTYPES.get(np.dtype(array.dtype).name)
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {array.dtype} has no safetensors code")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        header[name] = {"dtype": dtype, "shape": [int(d) for d in array.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, array in tensors:
            f.write(_raw_bytes(array))
    tmp.replace(path)
    return offset


def _write_weights(folder: pathlib.Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    """`model.safetensors`, or numbered shards plus `model.safetensors.index.json` when large."""
    sizes = {k: int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for k, v in tensors.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        if shards[-1] and used + sizes[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", tensors.items())
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, ((n, tensors[n]) for n in names))
        weight_map.update({n: file for n in names})
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})


def _write_json(path: pathlib.Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def st_prompts(prompts_spec: dict | None) -> dict[str, str]:
    """Our prompt templates as sentence-transformers prompt prefixes (EmbeddingGemma's names)."""
    prompts = Prompts.from_spec(prompts_spec)
    if prompts.to_dict() is None:
        return {}
    return {name: (prompts.document_prefix(None) if task is None else prompts.query_prefix(task))
            for name, task in ST_PROMPT_TASKS.items()}


def _tokenizer_source(spec: dict, src: pathlib.Path) -> pathlib.Path:
    tok = spec.get("tokenizer") or {}
    if not tok.get("file"):
        raise ValueError(f"the model spec of {src} names no tokenizer file; cannot write tokenizer files")
    return _resolve_file(tok["file"], src if src.is_dir() else src.parent)


def write_hf_folder(params, spec: dict, dst, *, tokenizer_file=None, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Writes `(params, spec)` as a transformers + sentence-transformers folder at `dst`."""
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; choose a directory path for the Hugging Face folder")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite or choose another directory")
        shutil.rmtree(dst)
    dst.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(spec["model"])
    tok_spec = spec.get("tokenizer") or {}
    max_length = int(tok_spec.get("max_length", 512))
    if tokenizer_file is None:
        tokenizer_file = _resolve_file(tok_spec.get("file", ""), None)
    special_ids = write_tokenizer_files(tok_spec, pathlib.Path(tokenizer_file), dst)
    if cfg.family == "gemma" and not cfg.use_qk_norm:
        log.warning("transformers runs Gemma / Gemma 2 causally: the exported weights are exact, but "
                    "only a Gemma 3 layout (bidirectional) reproduces embedder's encoder there")
    hf_cfg = config_to_hf(cfg, max_position_embeddings=max(max_length, 2048), special_ids=special_ids)
    if cfg.family == "bert":
        hf_cfg["max_position_embeddings"] = cfg.max_position_embeddings
    _write_json(dst / "config.json", hf_cfg)

    body, dense = params_to_hf(params, cfg)  # views of the host arrays, no copies yet
    _write_weights(dst, body, max_shard_bytes)

    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_TYPES["Transformer"]},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_TYPES["Pooling"]}]
    _write_json(dst / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(dst / "1_Pooling" / "config.json",
                {"embedding_dimension": cfg.hidden_size, "pooling_mode": "mean", "include_prompt": True})
    width = cfg.hidden_size
    for j, (tensors, out_dim) in enumerate(zip(dense, cfg.projection_dims)):
        idx = len(modules)
        folder = dst / f"{idx}_Dense"
        folder.mkdir()
        write_safetensors(folder / "model.safetensors", tensors.items())
        _write_json(folder / "config.json", {
            "in_features": width, "out_features": int(out_dim), "bias": False,
            "activation_function": "torch.nn.modules.linear.Identity", **_EMBEDDING_IO})
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Dense", "type": _ST_TYPES["Dense"]})
        width = int(out_dim)
    idx = len(modules)
    _write_json(dst / f"{idx}_Normalize" / "config.json", _EMBEDDING_IO)
    modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": _ST_TYPES["Normalize"]})
    _write_json(dst / "modules.json", modules)
    _write_json(dst / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": st_prompts(spec.get("prompts")),
        "default_prompt_name": None, "similarity_fn_name": "cosine"})
    return dst


def convert_to_hf(src, dst, *, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Converts any saved model at `src` into a Hugging Face folder at `dst`; returns `dst`."""
    src = pathlib.Path(src)
    params, spec = load_model(src)
    if "model" not in spec or "tokenizer" not in spec:
        raise ValueError(f"{src}: its model spec lacks 'model' or 'tokenizer' ({sorted(spec)})")
    model = spec["model"]
    if model.get("quant_scheme"):  # a QAT model runs its weights quantised: write them so, dequantised
        quantized, table = quantize_params(params, model["quant_scheme"], int(model.get("quant_block", 32)))
        params = dequantize_params(quantized, table, np.dtype(model.get("param_dtype", "float32")))
    src_abs, dst_abs = src.absolute(), pathlib.Path(dst).absolute()
    if dst_abs == src_abs or dst_abs in src_abs.parents:
        # --overwrite empties DST first, which would delete SRC.
        raise ValueError(f"to-hf: DST {dst} is SRC or contains it; write the Hugging Face folder elsewhere")
    return write_hf_folder(params, spec, dst, tokenizer_file=_tokenizer_source(spec, src),
                           overwrite=overwrite, max_shard_bytes=max_shard_bytes)

