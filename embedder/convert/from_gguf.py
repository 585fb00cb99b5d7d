"""Read a Gemma-family GGUF file (llama.cpp's format) into `(params, spec)` and write a parameter
export (`python -m embedder.convert from-gguf FILE.gguf DST`), through `from_hf`'s config and
tensor-layout rules (the metadata becomes a transformers config, the tensors get HF names)."""

from __future__ import annotations

import logging
import pathlib
import re

import jax
import numpy as np

from embedder.checkpoint import save_params
from embedder.convert.gguf_tokenizer import tokenizer_metadata, write_sentencepiece_model
from embedder.convert.from_hf import ConvertedModel
from embedder.convert.hf_config import config_from_hf
from embedder.convert.hf_mapping import encoder_rules, set_path
from embedder.model.layer_stack import stack_layers

log = logging.getLogger(__name__)

# GGUF general.architecture -> transformers model_type.
ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
# (architecture, layer count) of the 27B models, whose query scale is 1/sqrt(width / heads).
_WIDTH_SCALED_QUERIES = {("gemma2", 46), ("gemma3", 62)}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj"}
# Tensors of the language-model head, which an encoder does not use.
_UNUSED = ("output.weight", "rope_freqs.weight")


def is_gguf_file(path) -> bool:
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: pathlib.Path):
    try:  # imported here: only GGUF files need the package
        import gguf
    except ImportError as e:
        raise ImportError(f"reading {path} needs the `gguf` package ({e}); pip install gguf") from None
    if not is_gguf_file(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return gguf.GGUFReader(str(path))


def _fields(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a value type gguf cannot decode; no key we use has one
            continue
    return out


def hf_name(gguf_name: str, model_type: str) -> str | None:
    """The transformers tensor name of a GGUF tensor name (None: not part of the encoder)."""
    if gguf_name == "token_embd.weight":
        return "embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m:
        return None
    layer, kind = m.groups()
    if kind == "ffn_norm":  # the pre-FFW norm: Gemma 1 calls it post_attention_layernorm
        name = "post_attention_layernorm" if model_type == "gemma" else "pre_feedforward_layernorm"
    else:
        name = _LAYER_TENSORS.get(kind)
    return None if name is None else f"layers.{layer}.{name}.weight"


def _layer_types(fields: dict, arch: str, n_layers: int) -> list[str] | None:
    if arch != "gemma3":
        return None  # Gemma 2 alternates local/global from layer 0 (config_from_hf's default)
    pattern = fields.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, (list, tuple)):  # newer llama.cpp: one bool per layer, True = local
        if len(pattern) != n_layers:
            raise ValueError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    period = int(pattern)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]


def hf_config_from_gguf(fields: dict, source: str, vocab_size: int) -> dict:
    """A transformers-style config dict for `config_from_hf`, from GGUF metadata.

    llama.cpp's Gemma conventions, checked against transformers' GGUF loader: RMSNorm scales are
    stored as `1 + w` (we subtract 1), local layers use RoPE base 10,000, Gemma 3 has one global
    layer in six, and the query scale is 1/sqrt(head_dim) except for the 27B models
    (1/sqrt(width/heads)). A GGUF holds a causal LLM: its sliding window becomes the symmetric
    bound |i - j| < window of the bidirectional encoder (as `from-hf` does for a causal
    checkpoint), so each token keeps the reach it had looking back.
    """
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)} (the Gemma family)")

    def get(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
        if isinstance(value, float):  # stored as float32: 1e-6 reads back as 9.99999997e-07
            value = float(str(np.float32(value)))
        return value

    n_layers, hidden, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    hf = {
        "model_type": ARCHITECTURES[arch], "num_hidden_layers": n_layers, "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)), "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)), "vocab_size": vocab_size,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": int(fields.get("tokenizer.ggml.padding_token_id", 0)),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
    }
    if arch == "gemma":
        return hf
    scalar = hidden // heads if (arch, n_layers) in _WIDTH_SCALED_QUERIES else head_dim
    hf.update(query_pre_attn_scalar=scalar, sliding_window=int(get("attention.sliding_window", 4096)),
              attn_logit_softcapping=fields.get(f"{arch}.attn_logit_softcapping"),
              final_logit_softcapping=fields.get(f"{arch}.final_logit_softcapping"))
    if arch == "gemma3":
        scaling = fields.get("gemma3.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported; only none and linear")
        full = {"rope_type": "default", "rope_theta": hf["rope_theta"]}
        if scaling == "linear":
            full = dict(full, rope_type="linear", factor=float(get("rope.scaling.factor")))
        hf.update(layer_types=_layer_types(fields, arch, n_layers),
                  rope_parameters={"full_attention": full,
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    return hf


def _dequantize(tensor, source: str) -> np.ndarray:
    import gguf  # optional (see _reader), so loading other formats never needs it

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{source}: tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                         f"package cannot dequantise; re-quantise the file to a supported type") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest axis first
    return np.asarray(values, np.float32).reshape(shape)


def read_gguf(src, *, dtype=np.float32, shapes_only: bool = False, tokenizer_dir=None,
              **config_overrides) -> ConvertedModel:
    """Reads a Gemma-family GGUF file: dequantised weights, config from the metadata (a
    bidirectional encoder, mean pooling, no projection unless `projection_dims` is overridden),
    and a SentencePiece tokenizer rebuilt from the vocabulary (written under `tokenizer_dir`,
    default a cache folder). `shapes_only=True` dequantises nothing."""
    src = pathlib.Path(src).absolute()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} does not exist")
    reader = _reader(src)
    fields = _fields(reader)
    tokens = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tokens:
        raise ValueError(f"{src} has no token_embd.weight tensor; it does not look like a Gemma model")
    vocab_size = int(tokens["token_embd.weight"].shape[-1])
    hf = hf_config_from_gguf(fields, str(src), vocab_size)
    cfg = config_from_hf(hf, **config_overrides)
    if cfg.projection_dims:
        raise ValueError("a GGUF file holds no projection head; start a run with init_from it to add a fresh one")

    rules = {r.hf_name: r for r in encoder_rules(cfg)}
    params: dict = {}
    unused = []
    for name, tensor in tokens.items():
        rule = rules.pop(hf_name(name, hf["model_type"]) or "", None)
        if rule is None:
            unused.append(name)
            continue
        hf_shape = tuple(int(d) for d in reversed(tensor.shape))
        if shapes_only:
            value = jax.eval_shape(rule.layout.to_ours, jax.ShapeDtypeStruct(hf_shape, np.dtype(dtype)))
        else:
            value = _dequantize(tensor, str(src))
            if name.endswith("norm.weight"):  # llama.cpp stores Gemma's RMSNorm scale w as 1 + w
                value = value - 1.0
            value = rule.layout.to_ours(value).astype(dtype)
        set_path(params, rule.path, value)
    if rules:
        raise ValueError(f"{src} lacks {len(rules)} tensor(s) its metadata implies, e.g. {sorted(rules)[:3]} "
                         "(transformers names)")
    unexpected = [n for n in unused if n not in _UNUSED]
    if unexpected:
        raise ValueError(f"{src} has tensors a {hf['model_type']} encoder does not know, e.g. {unexpected[:3]}; "
                         "is the architecture metadata right?")
    if cfg.scan_layers:
        params = stack_layers(params, cfg)

    meta = tokenizer_metadata(fields, str(src))
    tok_file = write_sentencepiece_model(meta, tokenizer_dir)
    tok_spec = {"kind": "sentencepiece", "file": str(tok_file), "max_length": 512,
                "add_bos": bool(meta.get("add_bos_token", True)), "add_eos": bool(meta.get("add_eos_token", False))}
    spec = {"model": cfg.to_dict(), "tokenizer": tok_spec, "prompts": None}
    return ConvertedModel(params=params, config=cfg, spec=spec, tokenizer_file=tok_file)


def convert_from_gguf(src, dst, *, overwrite: bool = False, scan_layers: bool = False,
                      max_length: int = 512) -> pathlib.Path:
    """Converts a GGUF file and writes a parameter export (with `tokenizer.model`) to `dst`."""
    model = read_gguf(src, scan_layers=scan_layers)
    model.spec["tokenizer"]["max_length"] = int(max_length)
    return save_params(dst, model.params, model.spec, tokenizer_file=model.tokenizer_file, overwrite=overwrite)
