"""`python -m embedder.convert from-hf SRC_DIR DST_DIR | from-gguf FILE DST_DIR | to-hf SRC DST_DIR`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from embedder.cli_args import OneLineErrorParser

# Each command imports its converter when it runs, so `--help` and bad flags answer without
# loading JAX and Orbax.


def _from_hf(args) -> None:
    from embedder.convert.from_hf import convert_from_hf

    out = convert_from_hf(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote parameter export {out}")


def _from_gguf(args) -> None:
    from embedder.convert.from_gguf import convert_from_gguf

    start = time.time()
    out = convert_from_gguf(args.src, args.dst, overwrite=args.overwrite, max_length=args.max_length)
    print(f"wrote parameter export {out} ({time.time() - start:.0f} s)")


def _to_hf(args) -> None:
    from embedder.convert.to_hf import convert_to_hf

    out = convert_to_hf(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote Hugging Face / sentence-transformers folder {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m embedder.convert",
                                description="Convert Hugging Face folders and GGUF files to embedder parameter "
                                            "exports, and any saved model to a Hugging Face folder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    p = sub.add_parser("from-hf", help="transformers / sentence-transformers folder -> param export",
                       description="Read a transformers (Gemma, Gemma2, Gemma3 text, BERT) or "
                                   "sentence-transformers folder and write a parameter export.")
    p.add_argument("src", metavar="SRC_DIR", help="Hugging Face or sentence-transformers folder")
    p.add_argument("dst", metavar="DST_DIR", help="output directory for the parameter export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DST_DIR")
    p.set_defaults(func=_from_hf)
    p = sub.add_parser("from-gguf", help="Gemma-family GGUF file (llama.cpp) -> param export",
                       description="Read a Gemma, Gemma 2 or Gemma 3 GGUF file (any tensor type the gguf "
                                   "package dequantises), dequantise it to float32 and write a parameter "
                                   "export of the bidirectional encoder (mean pooling, no projection head) "
                                   "with a SentencePiece tokenizer.model rebuilt from the file's vocabulary.")
    p.add_argument("src", metavar="FILE", help="the .gguf file")
    p.add_argument("dst", metavar="DST_DIR", help="output directory for the parameter export")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokenizer max_length recorded in the export (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DST_DIR")
    p.set_defaults(func=_from_gguf)
    p = sub.add_parser("to-hf", help="any saved model -> transformers / sentence-transformers folder",
                       description="Write a workdir, checkpoint step, parameter export, soup or HF folder "
                                   "as a folder that transformers and sentence-transformers load as-is.")
    p.add_argument("src", metavar="SRC", help="workdir, checkpoint step dir, parameter export, soup, "
                                              "HF folder or GGUF file")
    p.add_argument("dst", metavar="DST_DIR", help="output directory for the Hugging Face folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST_DIR")
    p.set_defaults(func=_to_hf)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a subcommand is required: from-hf, from-gguf or to-hf")
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        sys.stderr.write(f"{parser.prog} {args.command}: error: DST_DIR {args.dst} is a file; pass the path of "
                         "a new or empty directory (or of an earlier output, with --overwrite)\n")
        return 1
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()   # this process is ours: the CPU tuning (embedder/cpu_tuning.py)
    sys.exit(main())
