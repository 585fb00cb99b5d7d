"""`python -m embedder.distill teacher --teacher MODEL --data FILE.jsonl[,FILE...] --out SIGNALS`

Runs a teacher embedder (workdir, checkpoint step, export, soup, Hugging Face /
sentence-transformers folder or GGUF file) once over JSONL training records and stores its
embeddings of every query, positive and negative (`--store embeddings`, default), its scores of
each record's (query, document) pairs (`--store scores`), or both. Train with them:
`--config.data.teacher=SIGNALS --config.loss.distill_embedding_weight=1` (and/or
`--config.loss.distill_score_weight=1`). Rerunning resumes an unfinished pass.
"""
from __future__ import annotations

import sys

from embedder.cli_args import OneLineErrorParser


def main(argv=None) -> int:
    parser = OneLineErrorParser(prog="python -m embedder.distill", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    t = sub.add_parser("teacher", help="store a teacher's embeddings / scores of a JSONL dataset")
    t.add_argument("--teacher", required=True, help="the teacher model (any path Embedder.load takes)")
    t.add_argument("--data", required=True, help="JSONL(.gz) training records, comma-separated for several")
    t.add_argument("--out", required=True, help="the signals directory to write (resumed when unfinished)")
    t.add_argument("--task", default=None, help="task of records without one (the dataset's task; default "
                   "'search result')")
    t.add_argument("--store", default="embeddings", choices=("embeddings", "scores", "both"))
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--max-length", type=int, default=None, help="token limit (default: the teacher's own)")
    t.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored embedding dtype")
    t.add_argument("--on-bad-record", default="strict", choices=("strict", "skip"))
    t.add_argument("--overwrite", action="store_true", help="replace signals already in --out")
    args = parser.parse_args(argv)

    from embedder import cpu_tuning
    cpu_tuning.tune_command()
    from embedder.data.prompts import DEFAULT_TASK
    from embedder.data.records import BadRecordError
    from embedder.distill.signals import SignalsError
    from embedder.distill.teacher import run_teacher

    try:
        run_teacher(args.teacher, [f.strip() for f in args.data.split(",") if f.strip()], args.out,
                    task=args.task or DEFAULT_TASK, store=args.store, batch_size=args.batch_size,
                    max_length=args.max_length, dtype=args.dtype, on_bad_record=args.on_bad_record,
                    overwrite=args.overwrite)
    except (SignalsError, BadRecordError, FileNotFoundError, ValueError) as e:
        print(f"python -m embedder.distill: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
