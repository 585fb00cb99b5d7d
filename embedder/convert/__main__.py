"""`python -m embedder.convert from-hf SRC_DIR DST_DIR` (subcommands dispatch here)."""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line on bad arguments, as every embedder CLI does.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _from_hf(args) -> None:
    from embedder.convert.from_hf import convert_from_hf

    out = convert_from_hf(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote parameter export {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m embedder.convert",
                     description="Convert between Hugging Face folders and embedder parameter exports.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("from-hf", help="transformers / sentence-transformers folder -> param export",
                       description="Read a transformers (Gemma, Gemma2, Gemma3 text, BERT) or "
                                   "sentence-transformers folder and write a parameter export.")
    p.add_argument("src", metavar="SRC_DIR", help="Hugging Face or sentence-transformers folder")
    p.add_argument("dst", metavar="DST_DIR", help="output directory for the parameter export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DST_DIR")
    p.set_defaults(func=_from_hf)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a subcommand is required: from-hf")
    try:
        args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
