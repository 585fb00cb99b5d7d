"""Tokenizer files that transformers loads as-is, written from an embedder tokenizer spec.

WordPiece: the model's tokenizer.json (with our `[CLS] ... [SEP]` template), vocab.txt.
SentencePiece: tokenizer.model plus a tokenizer.json built from the SentencePiece proto.
tokenizer.json (Gemma folders without tokenizer.model): the file with our BOS / EOS template.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

# SentencePiece's TrainerSpec.ModelType values.
_SP_UNIGRAM, _SP_BPE = 1, 2


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None):
    single = ([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else [])
    pair = single + ["$B"] + ([eos[0]] if eos else [])
    specials = [t for t in (bos, eos) if t is not None]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                         special_tokens=specials)


def _read_sp_proto(model_file: pathlib.Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the proto module needs protobuf
        raise ImportError(f"writing tokenizer.json for {model_file} needs the `protobuf` package "
                          f"to read the SentencePiece model ({e}); pip install protobuf") from None
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def _bpe_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list; a piece's score is its merge rank, so every split of
    a piece into two known pieces is a merge of that rank (what transformers' extractor does)."""
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def sentencepiece_to_tokenizers(model_file, add_bos: bool, add_eos: bool):
    """A `tokenizers.Tokenizer` that segments like the SentencePiece model (Unigram or BPE,
    byte fallback, its normaliser) and adds BOS / EOS as our SentencePieceTokenizer does."""
    model_file = pathlib.Path(model_file)
    proto = _read_sp_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk_id = trainer.unk_id
    if trainer.model_type == _SP_UNIGRAM:
        model = models.Unigram(pieces, unk_id, trainer.byte_fallback)
    elif trainer.model_type == _SP_BPE:
        model = models.BPE({p: i for i, (p, _) in enumerate(pieces)}, _bpe_merges(pieces),
                           unk_token=pieces[unk_id][0], fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_file}: SentencePiece model type {trainer.model_type} is not supported "
                         "for tokenizer.json export (Unigram and BPE are)")
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces (pad, bos, eos, ...) are never produced from text by SentencePiece either.
    control = [p.piece for p in proto.pieces if p.type in (2, 3)]  # UNKNOWN, CONTROL
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in control])
    bos = (pieces[trainer.bos_id][0], trainer.bos_id) if add_bos and trainer.bos_id >= 0 else None
    eos = (pieces[trainer.eos_id][0], trainer.eos_id) if add_eos and trainer.eos_id >= 0 else None
    tok.post_processor = _post_processor(bos, eos)
    special = {name: pieces[i][0] for name, i in (("pad_token", trainer.pad_id), ("bos_token", trainer.bos_id),
                                                  ("eos_token", trainer.eos_id), ("unk_token", unk_id))
               if i >= 0}
    return tok, special


def _special_ids(special: dict, tok) -> dict:
    return {k.replace("_token", "_token_id"): tok.token_to_id(v) for k, v in special.items()
            if k in ("pad_token", "bos_token", "eos_token")}


def write_tokenizer_files(tokenizer_spec: dict, source: pathlib.Path, dst: pathlib.Path) -> dict:
    """Writes the tokenizer files into `dst`; returns the special-token ids for config.json."""
    kind, max_length = tokenizer_spec.get("kind"), int(tokenizer_spec.get("max_length", 512))
    common = {"model_max_length": max_length, "padding_side": "right", "clean_up_tokenization_spaces": False}
    if kind == "wordpiece":
        tok = Tokenizer.from_file(str(source))
        tok.no_truncation()
        tok.no_padding()
        ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")}
        # Our WordPieceTokenizer always wraps the text in [CLS] ... [SEP]; say so in the file.
        tok.post_processor = _post_processor(("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"]))
        tok.save(str(dst / "tokenizer.json"))
        vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        (dst / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
        lower = _lowercases(json.loads(source.read_text(encoding="utf-8")))
        special = {f"{name}_token": f"[{name.upper()}]" for name in ("cls", "sep", "pad", "unk", "mask")
                   if ids[f"[{name.upper()}]"] is not None}
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lower, **special, **common}
        special_ids = {"pad_token_id": ids["[PAD]"]}
    elif kind == "sentencepiece":
        add_bos, add_eos = bool(tokenizer_spec.get("add_bos", True)), bool(tokenizer_spec.get("add_eos", True))
        tok, special = sentencepiece_to_tokenizers(source, add_bos, add_eos)
        tok.save(str(dst / "tokenizer.json"))
        if source.resolve() != (dst / "tokenizer.model").resolve():
            shutil.copyfile(source, dst / "tokenizer.model")
        # transformers' GemmaTokenizer rebuilds its own BPE pipeline and would ignore a Unigram
        # tokenizer.json; the generic class uses the file exactly as written.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
                  **special, **common}
        special_ids = _special_ids(special, tok)
    elif kind == "tokenizer_json":
        add_bos, add_eos = bool(tokenizer_spec.get("add_bos", True)), bool(tokenizer_spec.get("add_eos", False))
        names = {k: tokenizer_spec.get(k, default)
                 for k, default in (("bos_token", "<bos>"), ("eos_token", "<eos>"), ("pad_token", "<pad>"))}
        tok = Tokenizer.from_file(str(source))
        tok.no_truncation()
        tok.no_padding()
        # The file's own template may disagree with the spec; ours adds exactly what we add.
        tok.post_processor = _post_processor(
            (names["bos_token"], tok.token_to_id(names["bos_token"])) if add_bos else None,
            (names["eos_token"], tok.token_to_id(names["eos_token"])) if add_eos else None)
        tok.save(str(dst / "tokenizer.json"))
        special = {k: v for k, v in names.items() if tok.token_to_id(v) is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
                  **special, **common}
        special_ids = _special_ids(special, tok)
    else:
        raise ValueError(f"tokenizer kind {kind!r} cannot be exported; use 'wordpiece', 'sentencepiece' or "
                         "'tokenizer_json'")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (dst / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in config.items() if k.endswith("_token")}, indent=2) + "\n",
        encoding="utf-8")
    return special_ids


def _lowercases(tokenizer_json: dict) -> bool:
    norm = tokenizer_json.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return any(s.get("type") == "Lowercase" or (s.get("type") == "BertNormalizer" and s.get("lowercase"))
               for s in steps)
