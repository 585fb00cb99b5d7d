"""Command line: `python -m embedder.evaluate --model PATH --task DIR [--task DIR ...]`."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _dims(value: str) -> list[int]:
    try:
        dims = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dims wants comma-separated integers like 768,256, got {value!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--dims wants positive integers like 768,256, got {value!r}")
    return dims


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m embedder.evaluate",
        description="Evaluate an embedding model on task directories (retrieval, classification, clustering, "
                    "sts, pair_classification, reranking) at one or more Matryoshka dims.")
    p.add_argument("--model", required=True, help="workdir, checkpoint step, param export, soup or HF / "
                   "sentence-transformers folder (anything Embedder.load accepts)")
    p.add_argument("--task", action="append", required=True, metavar="DIR",
                   help="task directory (BEIR / MTEB layout, see embedder/evaluate/tasks.py); repeatable")
    p.add_argument("--dims", type=_dims, default=None, help="comma-separated MRL dims, e.g. 768,256 "
                   "(default: the model's full output dim)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a score-vs-dim plot here")
    p.add_argument("--batch_size", type=_positive, default=64, help="encoding batch size (default 64)")
    p.add_argument("--top_k", type=_positive, default=1000, help="retrieval depth for MAP (default 1000)")
    p.add_argument("--seeds", type=_positive, default=5,
                   help="seeded k-shot draws / k-means runs to average (default 5)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from embedder.evaluate.report import format_table
    from embedder.evaluate.runner import evaluate_tasks
    from embedder.evaluate.tasks import TaskFormatError, load_task

    try:
        # Read every task before loading the model, so a bad directory fails fast.
        tasks = [load_task(d) for d in args.task]
    except TaskFormatError as e:
        print(f"python -m embedder.evaluate: error: {e}", file=sys.stderr)
        return 2
    from embedder import Embedder

    try:
        model = Embedder.load(args.model)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m embedder.evaluate: error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2
    if args.dims:
        # Check the dims against the model's output size before the long encoding passes.
        full = model.encode(["dimension probe"], role="query").shape[1]
        too_big = [d for d in args.dims if d > full]
        if too_big:
            print(f"python -m embedder.evaluate: error: --dims {too_big} exceed the model's output dim {full}",
                  file=sys.stderr)
            return 2
    results = evaluate_tasks(model, tasks, args.dims, batch_size=args.batch_size, top_k=args.top_k,
                             seeds=args.seeds, progress=True)
    print(format_table(results))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(args.model), "dims": args.dims, "tasks": [str(t) for t in args.task],
                   "results": results}
        out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if args.plot:
        from embedder.evaluate.plots import plot_score_vs_dim

        print(f"wrote {plot_score_vs_dim(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
