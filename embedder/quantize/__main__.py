"""`python -m embedder.quantize SRC DST --scheme int8|int4|mixed [--block 32]`: a quantised
parameter export of any saved model (integer weights and scales; `Embedder.load`, `evaluate`,
soups and `convert to-hf` read it as the float model it encodes)."""
from __future__ import annotations

import json
import os
import sys

from embedder.cli_args import OneLineErrorParser

SCHEMES = ("int8", "int4", "mixed")


def build_parser():
    p = OneLineErrorParser(prog="python -m embedder.quantize",
                           description="Post-training quantisation of a workdir, checkpoint step, export, soup, "
                                       "HF folder or GGUF file into a quantised parameter export: int8 per output "
                                       "channel, int4 per block of input features (packed two a byte), or mixed "
                                       "(int8 attention, int4 embeddings, feed-forward and head projections).")
    p.add_argument("src", metavar="SRC", help="any saved model")
    p.add_argument("dst", metavar="DST", help="output directory of the quantised export")
    p.add_argument("--scheme", choices=SCHEMES, default=None,
                   help="default: the scheme the model was trained with (model.quant_scheme)")
    p.add_argument("--block", type=int, default=None,
                   help="int4 block of input features (0: one scale per channel; default: the model's "
                        "quant_block, 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in DST")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.block is not None and args.block < 0:
        parser.error(f"--block {args.block} must be >= 0")
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        sys.stderr.write(f"{parser.prog}: error: DST {args.dst} is a file; pass a new or empty directory\n")
        return 1
    from embedder.quantize import quantize_model
    try:
        report = quantize_model(args.src, args.dst, scheme=args.scheme, block=args.block, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 1
    mib = 1 << 20
    print(f"wrote {report['scheme']} export {report['out']}: {report['leaves']} quantised leaves, "
          f"params {report['bytes_on_disk'] / mib:.2f} MiB on disk ({report['bytes_float'] / mib:.2f} MiB as float32)")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()
    sys.exit(main())
