"""Tiny Gemma-family GGUF files, written as llama.cpp writes them (tensor names, norm scales
stored as 1 + w, SentencePiece vocabulary in `tokenizer.ggml.*`): random ones with quantised
tensors, and transformers Gemma 1 / Gemma 2 models' weights."""
from __future__ import annotations

import pathlib
import re

import numpy as np

# A tiny Gemma 3: K-quants need rows of 256 values, so width 256; one global layer in six.
TINY = dict(hidden=256, heads=2, kv_heads=1, head_dim=256, mlp=512, layers=6, window=8)
TEXTS = [
    "the quick brown fox jumps over the lazy dog", "package manager for debian systems",
    "a library for parsing json documents", "command line tool to resize partitions",
    "python bindings for the gtk toolkit", "fonts with wide unicode coverage 12345",
    "daemon that monitors disk health and reports errors", "utilities for compressing files",
] * 20


def train_bpe_model(prefix: pathlib.Path, vocab_size: int = 320) -> pathlib.Path:
    """A small byte-fallback BPE SentencePiece model, Gemma-style (pad 0, eos 1, bos 2, unk 3)."""
    from embedder.data.tokenizer import train_sentencepiece

    return pathlib.Path(train_sentencepiece(TEXTS, prefix, vocab_size, model_type="bpe",
                                            extra_options={"user_defined_symbols": ["<start_of_turn>"]}))


def _vocab(sp_model: pathlib.Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    tokens, scores, types = [], [], []
    for i, p in enumerate(proto.pieces):
        kind = p.type
        if i == proto.trainer_spec.unk_id:
            kind = 3  # llama.cpp's Gemma files mark <unk> as a control piece
        piece = p.piece.replace("▁", " ") if kind == 4 else p.piece  # user-defined pieces keep spaces
        tokens.append(piece)
        scores.append(p.score)
        types.append(kind)
    return tokens, scores, types, proto.trainer_spec


def _k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks with small, finite scales (the gguf package only dequantises these)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    small = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin first
        data[..., 0:2] = small
        data[..., 2:4] = small
    else:  # Q6_K: d last
        data[..., -2:] = small
    return data.reshape(rows, -1)


def _gemma_writer(path: pathlib.Path, sp_model: pathlib.Path, arch: str, *, layers: int, hidden: int, mlp: int,
                  heads: int, kv_heads: int, head_dim: int, eps: float = 1e-6, rope_base: float | None = None,
                  window: int | None = None, attn_softcap: float | None = None,
                  final_softcap: float | None = None):
    """A GGUFWriter holding llama.cpp's Gemma metadata and `sp_model`'s vocabulary
    (`tokenizer.ggml.*`); keys given as None are not written. Returns it and the vocabulary size."""
    import gguf

    tokens, scores, types, trainer = _vocab(sp_model)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny random gemma")
    w.add_context_length(1024)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(mlp)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(eps)
    if rope_base is not None:
        w.add_rope_freq_base(rope_base)
    if window is not None:
        w.add_sliding_window(window)
    if attn_softcap is not None:
        w.add_float32(f"{arch}.attn_logit_softcapping", attn_softcap)
    if final_softcap is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", final_softcap)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(trainer.bos_id)
    w.add_eos_token_id(trainer.eos_id)
    w.add_unk_token_id(trainer.unk_id)
    w.add_pad_token_id(trainer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    return w, len(tokens)


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gemma_gguf(path: pathlib.Path, sp_model: pathlib.Path, *, arch: str = "gemma3", seed: int = 0,
                          quantized: bool = True, **overrides) -> pathlib.Path:
    """Writes a tiny random `arch` ("gemma3" or "gemma2") GGUF file with `sp_model`'s vocabulary."""
    import gguf

    q = gguf.GGMLQuantizationType
    t = dict(TINY, **overrides)
    rng = np.random.default_rng(seed)
    gemma2 = arch == "gemma2"
    w, n_tokens = _gemma_writer(path, sp_model, arch, layers=t["layers"], hidden=t["hidden"], mlp=t["mlp"],
                                heads=t["heads"], kv_heads=t["kv_heads"], head_dim=t["head_dim"],
                                rope_base=1_000_000.0 if arch == "gemma3" else 10_000.0, window=t["window"],
                                attn_softcap=50.0 if gemma2 else None, final_softcap=30.0 if gemma2 else None)

    def dense(rows, cols, scale=0.05):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name, value, qtype=q.F32):
        if qtype in (q.Q4_K, q.Q6_K):
            w.add_tensor(name, _k_quant_blocks(rng, *value, qtype), raw_dtype=qtype)
        elif qtype == q.F32:
            w.add_tensor(name, value)
        elif qtype == q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    def norm(n):  # llama.cpp stores Gemma's RMSNorm scale w as 1 + w
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    h, f, d = t["hidden"], t["mlp"], t["head_dim"]
    nq, nkv = t["heads"] * d, t["kv_heads"] * d
    pick = (lambda kind: kind) if quantized else (lambda kind: q.F32)
    add("token_embd.weight", dense(n_tokens, h, 0.5), pick(q.Q8_0))
    add("output_norm.weight", norm(h))
    for i in range(t["layers"]):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", norm(h))
        add(b + "attn_q.weight", dense(nq, h), pick(q.Q5_0))
        add(b + "attn_k.weight", dense(nkv, h), pick(q.F16))
        add(b + "attn_v.weight", dense(nkv, h), pick(q.Q4_0))
        add(b + "attn_output.weight", dense(h, nq), pick(q.BF16))
        if arch == "gemma3":
            add(b + "attn_q_norm.weight", norm(d))
            add(b + "attn_k_norm.weight", norm(d))
        add(b + "post_attention_norm.weight", norm(h))
        add(b + "ffn_norm.weight", norm(h))
        add(b + "post_ffw_norm.weight", norm(h))
        if quantized:
            add(b + "ffn_gate.weight", (f, h), q.Q4_K)
            add(b + "ffn_up.weight", (f, h), q.Q6_K)
        else:
            add(b + "ffn_gate.weight", dense(f, h))
            add(b + "ffn_up.weight", dense(f, h))
        add(b + "ffn_down.weight", dense(h, f), pick(q.Q8_0))
    _finish(w)
    return path


# transformers layer tensor -> llama.cpp name (gguf-py's TensorNameMap for the Gemma architectures).
_HF_LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str, arch: str) -> str:
    if hf_name == "embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "norm.weight":
        return "output_norm.weight"
    layer, kind = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", hf_name).groups()
    if kind == "post_attention_layernorm":  # Gemma 1: the norm before the FFW; Gemma 2: after attention
        name = "ffn_norm" if arch == "gemma" else "post_attention_norm"
    else:
        name = _HF_LAYER_TO_GGUF[kind]
    return f"blk.{layer}.{name}.weight"


def write_hf_gemma_gguf(path: pathlib.Path, sp_model: pathlib.Path, config, state: dict,
                        *, rope_freq_base: bool = False) -> pathlib.Path:
    """Writes a transformers GemmaModel / Gemma2Model (`config`, and `state`: its state dict as
    numpy arrays) as llama.cpp's convert_hf_to_gguf.py writes it: F32 tensors in torch's
    (out, in) layout under llama.cpp's names, every RMSNorm scale w stored as 1 + w, the
    metadata that converter writes and `sp_model`'s vocabulary (whose size must be the
    config's). The converter writes no rope.freq_base for these architectures (llama.cpp
    then runs 10,000); `rope_freq_base=True` writes the config's rope_theta, which llama.cpp
    reads when present."""
    arch = config.model_type
    if arch not in ("gemma", "gemma2"):
        raise ValueError(f"not a Gemma 1 / Gemma 2 config: {arch!r}")
    gemma2 = arch == "gemma2"
    w, n_tokens = _gemma_writer(
        path, sp_model, arch, layers=config.num_hidden_layers, hidden=config.hidden_size,
        mlp=config.intermediate_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, eps=config.rms_norm_eps,
        rope_base=config.rope_parameters["rope_theta"] if rope_freq_base else None,
        window=config.sliding_window if gemma2 else None,
        attn_softcap=config.attn_logit_softcapping if gemma2 else None,
        final_softcap=config.final_logit_softcapping if gemma2 else None)
    if n_tokens != config.vocab_size:
        raise ValueError(f"the config has vocab_size {config.vocab_size}, the SentencePiece model {n_tokens} pieces")
    for name, value in state.items():
        value = np.asarray(value, np.float32)
        if name.endswith("norm.weight"):
            value = value + 1.0
        w.add_tensor(_gguf_name(name, arch), value)
    _finish(w)
    return path
