"""Command line: `python -m embedder.evaluate --model PATH --task DIR [--task DIR ...]`."""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from embedder.cli_args import OneLineErrorParser

# The evaluators (scikit-learn) and Embedder (JAX) are imported inside the functions, so that
# `--help` and bad flags answer without loading them.


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
    p = OneLineErrorParser(
        prog="python -m embedder.evaluate",
        description="Evaluate an embedding model on task directories (retrieval, classification, clustering, "
                    "sts, pair_classification, reranking) at one or more Matryoshka dims.")
    p.add_argument("--model", required=True, help="workdir, checkpoint step, param export, soup or HF / "
                   "sentence-transformers folder (anything Embedder.load accepts)")
    p.add_argument("--task", action="append", required=True, metavar="DIR",
                   help="task directory (BEIR / MTEB layout, see embedder/evaluate/tasks.py); repeatable")
    p.add_argument("--dims", type=_dims, default=None, help="comma-separated MRL dims, e.g. 768,256 "
                   "(default: the model's own Matryoshka dims, else its full output dim)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write a score-vs-dim plot here")
    p.add_argument("--batch_size", type=_positive, default=64, help="encoding batch size (default 64)")
    p.add_argument("--top_k", type=_positive, default=1000, help="retrieval depth for MAP (default 1000)")
    p.add_argument("--seeds", type=_positive, default=5,
                   help="seeded k-shot draws / k-means runs to average (default 5)")
    p.add_argument("--queries", choices=("all", "select", "report"), default="all",
                   help="which of each retrieval task's queries to score: all (default), or one half of the "
                        "fixed split that python -m embedder.soup --task selects on (report: the half it "
                        "never sees); other task types are scored whole")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the query split (default 0; the soup's --split-seed, recorded in soup.json)")
    return p


def split_queries(tasks: list, half: str, seed: int) -> dict:
    """Keeps only `half` of each retrieval task's queries (in place) -> `{task name: split record}`."""
    from embedder.evaluate.query_split import QuerySplitError, describe_split, split_task

    splits = {}
    for i, full in enumerate(tasks):
        if full.type == "retrieval":
            tasks[i] = split_task(full, half, seed)
            splits[full.name] = describe_split(full, tasks[i], half, seed)
    if not splits:
        raise QuerySplitError(f"--queries {half} splits retrieval tasks' queries, and none of the tasks given "
                              "is a retrieval task; leave --queries out")
    return splits


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from embedder.evaluate.report import format_table
    from embedder.evaluate.runner import evaluate_tasks
    from embedder.evaluate.tasks import load_task

    try:
        # Read (and split) every task before loading the model, so a bad directory fails fast.
        tasks = [load_task(d) for d in args.task]
        splits = split_queries(tasks, args.queries, args.split_seed) if args.queries != "all" else {}
    except ValueError as e:   # TaskFormatError, QuerySplitError
        print(f"python -m embedder.evaluate: error: {e}", file=sys.stderr)
        return 2
    for name, split in splits.items():
        print(f"{name}: the {split['half']} half of the queries ({split['queries']} of {split['of']}, "
              f"split seed {split['split_seed']})")
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
    if not args.dims:  # the model's own Matryoshka dims; an encoder without a config: its full width
        config = getattr(model, "config", None)
        args.dims = (list(config.matryoshka_dims) if config is not None
                     else [model.encode(["dimension probe"], role="query").shape[1]])
    results = evaluate_tasks(model, tasks, args.dims, batch_size=args.batch_size, top_k=args.top_k,
                             seeds=args.seeds, progress=True)
    for name, split in splits.items():
        results[name]["query_split"] = split
    print(format_table(results))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(args.model), "dims": args.dims, "tasks": [str(t) for t in args.task],
                   "queries": args.queries, "split_seed": args.split_seed, "results": results}
        out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if args.plot:
        from embedder.evaluate.plots import plot_score_vs_dim

        print(f"wrote {plot_score_vs_dim(results, args.plot)}")
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()   # this process is ours: the CPU tuning (embedder/cpu_tuning.py)
    sys.exit(main())
