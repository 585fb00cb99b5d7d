"""Train the shipped SentencePiece model (or one of your own) from JSONL pairs.

    python -m embedder.data.train_tokenizer --out embedder/assets/debian_sp8k \
        [--input data/debian/train_pairs.jsonl.gz] [--vocab-size 8192]

reproduces `embedder/assets/debian_sp8k.model` from the shipped Debian pairs.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from embedder.data.jsonl import iter_jsonl
from embedder.data.prompts import TASK_NAMES, Prompts
from embedder.data.tokenizer import train_sentencepiece

REPO_DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "debian" / "train_pairs.jsonl.gz"


def pair_texts(path: str | pathlib.Path, fields=("query", "positive")):
    """Yields the `fields` strings of every JSONL(.gz) record in `path`."""
    def bad(message):
        raise SystemExit(f"{message}; fix or remove the line")

    for _, record in iter_jsonl(path, on_error=bad):
        for field in fields:
            value = record.get(field)
            if isinstance(value, str) and value:
                yield value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model prefix; writes PREFIX.model")
    parser.add_argument("--input", action="append", default=None,
                        help=f"JSONL(.gz) pair file(s) (default: {REPO_DATA})")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    args = parser.parse_args(argv)
    inputs = args.input or [REPO_DATA]
    for path in inputs:
        if not pathlib.Path(path).exists():
            parser.error(f"input file not found: {path}")

    def texts():
        # The prompt strings appear in every training input; make sure their characters
        # (e.g. "|") get real pieces instead of byte fallback.
        prompts = Prompts()
        for _ in range(100):
            for task in TASK_NAMES:
                yield prompts.query_prefix(task).rstrip()
            yield prompts.document_prefix(None).rstrip()
        for path in inputs:
            yield from pair_texts(path)

    model_file = train_sentencepiece(texts(), args.out, args.vocab_size, model_type=args.model_type)
    print(f"wrote {model_file} ({pathlib.Path(model_file).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
