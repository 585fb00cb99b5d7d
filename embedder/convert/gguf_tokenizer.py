"""A SentencePiece `tokenizer.model` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

# SentencePiece's ModelProto.SentencePiece.Type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SP_BPE = 2
_SPECIALS = (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"),
             ("pad", "padding_token_id"))


def _proto_module():
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the proto module needs protobuf
        raise ImportError(f"rebuilding a SentencePiece model from GGUF needs the `protobuf` package ({e}); "
                          "pip install protobuf") from None
    return pb


def tokenizer_metadata(fields: dict, source: str) -> dict:
    """The tokenizer entries of a GGUF file's metadata (`{key without prefix: value}`)."""
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{source} has no tokenizer metadata (tokenizer.ggml.model); it cannot be encoded "
                         "without its vocabulary")
    if model != "llama":
        raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported; Gemma-family GGUF files "
                         "use SentencePiece ('llama')")
    for key in ("tokens", "scores", "token_type"):
        if f"tokenizer.ggml.{key}" not in fields:
            raise ValueError(f"{source} lacks tokenizer.ggml.{key}; a SentencePiece model needs pieces, "
                             "scores and piece types")
    return {k[len("tokenizer.ggml."):]: v for k, v in fields.items() if k.startswith("tokenizer.ggml.")}


def sentencepiece_proto_bytes(meta: dict) -> bytes:
    """The serialised SentencePiece ModelProto of GGUF tokenizer metadata.

    llama.cpp keeps a SentencePiece ("llama") vocabulary as three arrays - pieces, scores and
    piece types (SentencePiece's own type numbers) - plus the special ids. Gemma's models are
    byte-fallback BPE with an identity normaliser, no dummy prefix and split digits; GGUF stores
    user-defined whitespace pieces with literal spaces, which SentencePiece only matches as "▁".
    """
    pb = _proto_module()
    tokens, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"GGUF tokenizer arrays differ in length: {len(tokens)} tokens, {len(scores)} scores, "
                         f"{len(types)} types")
    ids = {name: int(meta[key]) if key in meta else -1 for name, key in _SPECIALS}
    if ids["unk"] < 0:
        raise ValueError("GGUF tokenizer metadata has no unknown_token_id; SentencePiece needs an <unk> piece")
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        kind = int(kind)
        if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise ValueError(f"GGUF token {i} ({piece!r}) has piece type {kind}, not a SentencePiece type")
        if i == ids["unk"]:
            kind = UNKNOWN  # llama.cpp marks <unk> as a control piece; SentencePiece needs it UNKNOWN
        elif kind == UNKNOWN:
            kind = CONTROL
        if kind == USER_DEFINED:
            piece = piece.replace(" ", "▁")
        proto.pieces.add(piece=piece, score=float(score), type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = _SP_BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = any(int(t) == BYTE for t in types)
    trainer.split_digits = True
    trainer.split_by_whitespace = False
    trainer.allow_whitespace_only_pieces = True
    for name, i in ids.items():
        setattr(trainer, f"{name}_id", i)
        if i >= 0:  # SentencePiece finds special ids by these names; unnamed ones report -1
            setattr(trainer, f"{name}_piece", proto.pieces[i].piece)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def write_sentencepiece_model(meta: dict, cache_dir=None) -> pathlib.Path:
    """Writes the rebuilt `tokenizer.model` into a content-addressed cache folder (default
    `$XDG_CACHE_HOME/embedder/gguf_tokenizers`) and returns its path; the same vocabulary
    is written once."""
    data = sentencepiece_proto_bytes(meta)
    root = pathlib.Path(cache_dir or os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    if cache_dir is None:
        root = root / "embedder" / "gguf_tokenizers"
    folder = root / hashlib.sha256(data).hexdigest()[:16]
    path = folder / "tokenizer.model"
    if path.is_file() and path.read_bytes() == data:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokenizer.model.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path
