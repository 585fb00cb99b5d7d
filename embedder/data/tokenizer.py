"""Tokenizers behind one small protocol: prompt-preserving truncation, special tokens, padding.

SentencePiece serves the Gemma family; HF `tokenizers` files serve BERT-family checkpoints and
Gemma-family folders that ship only a `tokenizer.json`.
"""
from __future__ import annotations

import abc

import os
import pathlib
from typing import Iterable, Protocol, Sequence

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

ASSETS_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets"


class Tokenizer(Protocol):
    pad_id: int
    vocab_size: int
    max_length: int

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               prefixes: Sequence[str] | None = None) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _check_inputs(texts, prefixes, max_length, default_max_length, num_special):
    """Validates encode() arguments; returns (texts, prefixes, max_length) as lists/int."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of strings, got one str; wrap it: encode([text])")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"encode(): texts[{i}] is {type(t).__name__}, expected str "
                            "(replace None/missing texts before tokenising)")
    if prefixes is None:
        prefixes = [""] * len(texts)
    else:
        if isinstance(prefixes, str):
            prefixes = [prefixes] * len(texts)
        prefixes = list(prefixes)
        if len(prefixes) != len(texts):
            raise ValueError(f"encode(): {len(prefixes)} prefixes for {len(texts)} texts; give one per text")
        for i, p in enumerate(prefixes):
            if p is None:
                prefixes[i] = ""
            elif not isinstance(p, str):
                raise TypeError(f"encode(): prefixes[{i}] is {type(p).__name__}, expected str")
    max_length = default_max_length if max_length is None else int(max_length)
    if max_length <= num_special:
        raise ValueError(f"encode(): max_length={max_length} leaves no room for text next to "
                         f"{num_special} special token(s); use a larger max_length")
    return texts, prefixes, max_length


def _truncate(joint_ids: list[int], prefix_len: int, budget: int, prefix: str) -> list[int]:
    # The prompt comes first in the joint encoding, so cutting from the right only ever
    # removes text tokens as long as the prompt's own tokens fit in the budget.
    if prefix_len > budget:
        raise ValueError(f"prompt {prefix!r} takes {prefix_len} tokens but only {budget} fit in "
                         "max_length after special tokens; raise max_length or shorten the prompt")
    return joint_ids[:budget]


class _SpecialTokensAround(abc.ABC):
    """`encode` shared by the tokenizers: `bos? prompt+text eos?`, the text cut to fit `max_length`,
    the prompt never. A subclass sets `add_bos`, `add_eos`, `bos_id`, `eos_id`, `max_length` and
    implements `_ids(strings)`: each string's token ids without special tokens."""

    add_bos: bool
    add_eos: bool
    max_length: int

    @abc.abstractmethod
    def _ids(self, strings: list[str]) -> list[list[int]]:
        """Each string's token ids, without special tokens."""

    @property
    def num_special(self) -> int:
        return int(self.add_bos) + int(self.add_eos)

    def encode(self, texts, max_length=None, prefixes=None) -> list[list[int]]:
        texts, prefixes, max_length = _check_inputs(texts, prefixes, max_length, self.max_length,
                                                    self.num_special)
        budget = max_length - self.num_special
        joint = self._ids([p + t for p, t in zip(prefixes, texts)])
        unique_prefixes = sorted(set(prefixes))
        prefix_lens = {p: len(ids) for p, ids in zip(unique_prefixes, self._ids(unique_prefixes))}
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return [head + _truncate(ids, prefix_lens[p], budget, p) + tail for ids, p in zip(joint, prefixes)]


class SentencePieceTokenizer(_SpecialTokensAround):
    """SentencePiece model (Gemma-style): `<bos> prompt+text <eos>`, pad id from the model."""

    family = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, add_bos: bool = True, add_eos: bool = True,
                 max_length: int = 512, num_threads: int = 0):
        model_file = pathlib.Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file} "
                                    "(check the tokenizer 'file' entry of the model spec)")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file), num_threads=num_threads)
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.max_length = int(max_length)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self.unk_id = self._sp.unk_id()
        pad = self._sp.pad_id()
        # A model trained without a pad piece reports -1; 0 is then the usual choice (unk).
        self.pad_id = pad if pad >= 0 else 0
        if self.add_bos and self.bos_id < 0:
            raise ValueError(f"{model_file} has no BOS piece; pass add_bos=False")
        if self.add_eos and self.eos_id < 0:
            raise ValueError(f"{model_file} has no EOS piece; pass add_eos=False")

    def _ids(self, strings: list[str]) -> list[list[int]]:
        return self._sp.encode(strings)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": self.model_file.name, "max_length": self.max_length,
                "add_bos": self.add_bos, "add_eos": self.add_eos}


class TokenizerJson(_SpecialTokensAround):
    """Any HF `tokenizers` file (e.g. a Gemma BPE `tokenizer.json`): `bos prompt+text eos`, with
    the BOS / EOS / PAD tokens named in the spec. Special tokens written in the text are matched,
    as transformers' tokenizer of that file matches them."""

    family = "tokenizer_json"

    def __init__(self, tokenizer_json: str | os.PathLike, *, add_bos: bool = True, add_eos: bool = False,
                 bos_token: str | None = "<bos>", eos_token: str | None = "<eos>", pad_token: str = "<pad>",
                 max_length: int = 512):
        tokenizer_json = pathlib.Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_json} "
                                    "(check the tokenizer 'file' entry of the model spec)")
        self.model_file = tokenizer_json
        self._tok = HFTokenizer.from_file(str(tokenizer_json))
        # Truncation/padding settings saved in the file would fight ours; we do both ourselves.
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_length = int(max_length)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)
        self.tokens = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        wanted = {"pad": pad_token, "bos": bos_token if add_bos else None, "eos": eos_token if add_eos else None}
        ids = {k: (self._tok.token_to_id(v) if v is not None else None) for k, v in wanted.items()}
        missing = [wanted[k] or f"<{k} token>" for k in wanted
                   if ids[k] is None and (k == "pad" or getattr(self, f"add_{k}"))]
        if missing:
            raise ValueError(f"{tokenizer_json} lacks the special token(s) {missing} the tokenizer spec names; "
                             "set bos_token / eos_token / pad_token in the spec to tokens of this vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    def _ids(self, strings: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(strings, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def spec(self) -> dict:
        return {"kind": "tokenizer_json", "file": self.model_file.name, "max_length": self.max_length,
                "add_bos": self.add_bos, "add_eos": self.add_eos, "bos_token": self.tokens["bos"],
                "eos_token": self.tokens["eos"], "pad_token": self.tokens["pad"]}


class WordPieceTokenizer(TokenizerJson):
    """BERT-family tokenizer from a HF `tokenizer.json`: `[CLS] prompt+text [SEP]`.

    Normalisation (lower-casing, accent stripping) is whatever the tokenizer.json says.
    """

    family = "wordpiece"

    def __init__(self, tokenizer_json: str | os.PathLike, max_length: int = 512):
        try:
            super().__init__(tokenizer_json, add_bos=True, add_eos=True, bos_token="[CLS]", eos_token="[SEP]",
                             pad_token="[PAD]", max_length=max_length)
        except ValueError as e:
            raise ValueError(f"{e}; WordPieceTokenizer expects a BERT-family tokenizer.json") from None
        self.cls_id, self.sep_id = self.bos_id, self.eos_id
        self.unk_id = self._tok.token_to_id("[UNK]")

    def spec(self) -> dict:
        return {"kind": "wordpiece", "file": self.model_file.name, "max_length": self.max_length}


def _resolve_file(name: str, base_dir) -> pathlib.Path:
    """Finds a tokenizer file: absolute, relative to `base_dir`, or a shipped asset name."""
    path = pathlib.Path(os.path.expanduser(name))
    candidates = [path] if path.is_absolute() else []
    if not path.is_absolute():
        if base_dir is not None:
            candidates.append(pathlib.Path(base_dir) / path)
        candidates.append(ASSETS_DIR / path)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"tokenizer file {name!r} not found (looked in: "
                            f"{', '.join(str(c) for c in candidates)}); put it next to model.json "
                            "or give an absolute path in the spec's tokenizer.file")


def load_tokenizer(spec: dict, base_dir=None) -> Tokenizer:
    """Builds the tokenizer that a model spec's `tokenizer` entry describes.

    `spec`: {"kind": "sentencepiece"|"wordpiece"|"tokenizer_json", "file": ..., "max_length": 512,
    "add_bos": True, "add_eos": True} (`tokenizer_json` also takes `bos_token`, `eos_token`,
    `pad_token`). `file` is absolute, relative to `base_dir`,
    or the name of a file in `embedder/assets/` (e.g. "debian_sp8k.model").
    """
    if not isinstance(spec, dict):
        raise TypeError(f"load_tokenizer(): spec must be a dict, got {type(spec).__name__}")
    kind = spec.get("kind")
    if "file" not in spec:
        raise ValueError(f"tokenizer spec {spec!r} has no 'file' entry")
    max_length = int(spec.get("max_length", 512))
    path = _resolve_file(spec["file"], base_dir)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, add_bos=spec.get("add_bos", True),
                                      add_eos=spec.get("add_eos", True), max_length=max_length)
    if kind == "wordpiece":
        return WordPieceTokenizer(path, max_length=max_length)
    if kind == "tokenizer_json":
        named = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if k in spec}
        return TokenizerJson(path, add_bos=spec.get("add_bos", True), add_eos=spec.get("add_eos", False),
                             max_length=max_length, **named)
    raise ValueError(f"tokenizer spec kind {kind!r} is unknown; use 'sentencepiece', 'wordpiece' or "
                     "'tokenizer_json'")


def length_buckets(max_length: int, smallest: int = 16, per_octave: int = 1) -> tuple[int, ...]:
    """Padded lengths from `smallest` up to `max_length` (always included).

    `per_octave` buckets per doubling of `smallest`, never closer than `smallest`: 1 gives
    `smallest`, 2x, 4x, ... (few compiles, up to 2x padding); 4 gives 16, 32, 48, 64, 80, ...,
    128, 160, ... from 16 (at most ~25% padding, 4x the compiles).
    """
    if smallest < 1 or per_octave < 1:
        raise ValueError(f"length_buckets: smallest={smallest} and per_octave={per_octave} must be >= 1")
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        octave = smallest << ((b // smallest).bit_length() - 1)  # largest smallest * 2**k <= b
        b += max(smallest, octave // per_octave)
    return tuple(out) + (max_length,)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, buckets: Sequence[int] | None = None,
              max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads `seqs` into int32 `(ids, mask)` of shape [N, L].

    `L` is the smallest bucket >= the longest row (or the longest row when `buckets`
    is None). `max_length` caps `L`; a row longer than the cap or every bucket is an error
    (truncate when encoding, not here, so the EOS/SEP token survives).
    """
    lengths = [len(s) for s in seqs]
    longest = max(lengths, default=0)
    if max_length is not None and longest > max_length:
        raise ValueError(f"pad_batch(): a row has {longest} tokens > max_length={max_length}; "
                         "encode with max_length to truncate first")
    if buckets:
        fitting = [b for b in sorted(int(b) for b in buckets) if b >= max(longest, 1)]
        if max_length is not None:
            fitting = [b for b in fitting if b <= max_length] or ([max_length] if longest <= max_length else [])
        if not fitting:
            raise ValueError(f"pad_batch(): longest row has {longest} tokens, above every bucket "
                             f"{sorted(buckets)}; add a bucket >= {longest} or truncate when encoding")
        length = fitting[0]
    else:
        length = max(longest, 1)
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return ids, mask


def train_sentencepiece(texts_or_files: Iterable[str] | str | os.PathLike | Sequence[os.PathLike],
                        model_prefix: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        input_sentence_size: int = 2_000_000, seed_sentencepiece_size: int = 1_000_000,
                        num_threads: int = 2, extra_options: dict | None = None) -> str:
    """Trains a Gemma-style SentencePiece model; returns the path of `PREFIX.model`.

    `texts_or_files`: an iterable of strings, or one or more plain-text files (one
    sentence a line). Ids follow Gemma: pad=0, eos=1, bos=2, unk=3. Byte fallback makes
    every Unicode string encodable, and identity normalisation without a dummy prefix
    makes `decode(encode(x)) == x`.
    """
    options = dict(
        model_prefix=str(model_prefix), vocab_size=int(vocab_size), model_type=model_type,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        seed_sentencepiece_size=seed_sentencepiece_size, shuffle_input_sentence=True,
        num_threads=num_threads, train_extremely_large_corpus=False, minloglevel=2,
    )
    options.update(extra_options or {})
    pathlib.Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    if isinstance(texts_or_files, (list, tuple)) and texts_or_files and all(
            isinstance(x, os.PathLike) or (isinstance(x, str) and os.path.isfile(x)) for x in texts_or_files):
        spm.SentencePieceTrainer.train(input=",".join(str(x) for x in texts_or_files), **options)
    else:
        # SentencePiece treats newlines as sentence breaks; keep one sentence per item.
        sentences = (line for t in texts_or_files for line in str(t).split("\n") if line.strip())
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, **options)
    return str(model_prefix) + ".model"
