"""Tiny random Gemma-family GGUF files, written as llama.cpp writes them (tensor names, norm
scales stored as 1 + w, SentencePiece vocabulary in `tokenizer.ggml.*`), with quantised tensors."""
from __future__ import annotations

import pathlib

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


def write_tiny_gemma_gguf(path: pathlib.Path, sp_model: pathlib.Path, *, arch: str = "gemma3", seed: int = 0,
                          quantized: bool = True, **overrides) -> pathlib.Path:
    """Writes a tiny random `arch` ("gemma3" or "gemma2") GGUF file with `sp_model`'s vocabulary."""
    import gguf

    q = gguf.GGMLQuantizationType
    t = dict(TINY, **overrides)
    tokens, scores, types, trainer = _vocab(sp_model)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny random gemma")
    w.add_context_length(1024)
    w.add_block_count(t["layers"])
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["mlp"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_key_length(t["head_dim"])
    w.add_value_length(t["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0 if arch == "gemma3" else 10_000.0)
    w.add_sliding_window(t["window"])
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", 50.0)
        w.add_float32(f"{arch}.final_logit_softcapping", 30.0)
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
    add("token_embd.weight", dense(len(tokens), h, 0.5), pick(q.Q8_0))
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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
