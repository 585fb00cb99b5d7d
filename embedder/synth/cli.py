"""`python -m embedder.synth queries|filter|classify|negatives`: synthetic data command lines.

LLM answers are cached on disk as they arrive, by default in `OUT.llm_cache/` beside `--out`
(`--cache-dir` elsewhere, `--no-cache` in memory only), so the same command rerun after a
kill or a crash asks no answered prompt again.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time

from embedder.cli_args import OneLineErrorParser
from embedder.synth.cache import MemoryCache, ResponseCache
from embedder.synth.classify import ClassifySpec, generate_classification
from embedder.synth.filtering import DEFAULT_PARAMS as FILTER_PARAMS, filter_pairs
from embedder.synth.clients import make_client
from embedder.synth.lexical import MissingBM25
from embedder.synth.queries import DEFAULT_PARAMS as QUERY_PARAMS, generate_queries
from embedder.synth.records import JsonlWriter, read_pairs, read_passages
from embedder.synth.retry import FatalLLMError, RetryPolicy
from embedder.synth.runner import LLMRunner

log = logging.getLogger("embedder.synth")


def _llm_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("LLM")
    g.add_argument("--llm", required=required, metavar="BACKEND:MODEL",
                   help="openai:MODEL (any OpenAI-compatible server at --base-url) or gemini:MODEL")
    g.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (gemini: API endpoint override)")
    g.add_argument("--api-key-env", help="environment variable holding the key (default OPENAI_API_KEY, or "
                                         "GEMINI_API_KEY / GOOGLE_API_KEY); keys are never written anywhere")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    cache = g.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", help="answer cache directory (default OUT.llm_cache beside --out); a "
                                           "rerun or resumed run reuses every stored answer")
    cache.add_argument("--no-cache", action="store_true",
                       help="keep answers in memory only: a rerun asks (and pays for) every prompt again")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--backoff", type=float, default=1.0, help="base backoff seconds, doubled per retry, jittered")
    g.add_argument("--max-backoff", type=float, default=60.0)
    g.add_argument("--temperature", type=float, help="override the pipeline's default temperature")


def _io_flags(p: argparse.ArgumentParser, needs_in: bool = True) -> None:
    if needs_in:
        p.add_argument("--in", dest="inp", required=True, help="input .jsonl / .jsonl.gz")
    p.add_argument("--out", required=True, help="output .jsonl (or .jsonl.gz)")
    p.add_argument("--limit", type=int, help="use only the first N input records")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of skipping it")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and every retry")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m embedder.synth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    q = sub.add_parser("queries", help="few-shot query generation for passages")
    _io_flags(q)
    _llm_flags(q, required=True)
    q.add_argument("--task-types", default="retrieval",
                   help="comma list of retrieval, question_answering, fact_checking (default retrieval)")
    q.add_argument("--queries-per-passage", type=int, default=1)

    f = sub.add_parser("filter", help="LLM-rate (query, positive) pairs and drop low ones")
    _io_flags(f)
    _llm_flags(f, required=True)
    f.add_argument("--threshold", type=float, default=2.0, help="keep ratings >= this on the 0-3 scale (default 2)")
    f.add_argument("--check-negatives", action="store_true", help="also rate negatives; drop those rated >= threshold")

    c = sub.add_parser("classify", help="multi-stage synthetic classification data")
    _io_flags(c)
    _llm_flags(c, required=True)

    n = sub.add_parser("negatives",
                       help="mine hard negatives with an embedding model or BM25 (optionally LLM-ranked)")
    _io_flags(n)
    _llm_flags(n, required=False)
    n.add_argument("--retriever", default="model", choices=("model", "bm25"),
                   help="model (default): rank the corpus by cosine of --model's embeddings; bm25: rank it by "
                        "BM25 over the texts (bm25s, lower-cased words, CJK bigrams; no model), only documents "
                        "sharing a word with the query")
    n.add_argument("--model", help="embedding model PATH for Embedder.load (required with --retriever model)")
    n.add_argument("--corpus", help="extra documents (.jsonl[.gz] with text/title, or pair records)")
    n.add_argument("--task", help="task string for the model's prompts (e.g. 'search result'; --retriever model)")
    n.add_argument("--num-negatives", type=int, default=1)
    n.add_argument("--top-k", type=int, default=30, help="candidates per query shown to the LLM (default 30)")
    n.add_argument("--rank-window", default="10:30",
                   help="without --llm: pick negatives from these 1-based ranks, inclusive (default 10:30)")
    n.add_argument("--duplicate-threshold", type=float, default=0.95,
                   help="drop candidates with cosine >= this to a positive (default 0.95): embedding cosine, or "
                        "bag-of-words cosine with --retriever bm25")
    n.add_argument("--index", default="auto", choices=("auto", "exact", "faiss"),
                   help="nearest-neighbour search for --retriever model (default auto)")
    n.add_argument("--relabel-positive", action="store_true", help="with --llm: the top-ranked candidate becomes the positive")
    n.add_argument("--batch-size", type=int, default=64)
    n.add_argument("--seed", type=int, default=0)
    return parser


def default_cache_dir(out: str) -> str:
    """Where answers are cached without --cache-dir: `OUT.llm_cache` beside the output file."""
    return os.fspath(out) + ".llm_cache"


def _make_runner(args) -> LLMRunner:
    client = make_client(args.llm, base_url=args.base_url, timeout=args.timeout, api_key_env=args.api_key_env)
    cache = MemoryCache() if args.no_cache else ResponseCache(args.cache_dir or default_cache_dir(args.out))
    policy = RetryPolicy(max_retries=args.max_retries, base_delay=args.backoff, max_delay=args.max_backoff)
    return LLMRunner(client, cache, concurrency=args.concurrency, retry=policy)


def _limited(it, limit):
    for i, x in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield x


def _params(defaults, args):
    params = dict(defaults)
    if args.temperature is not None:
        params["temperature"] = args.temperature
    return params


def run(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "negatives":
        if args.retriever == "model" and not args.model:
            parser.error("negatives: --model PATH is required with --retriever model (or use --retriever bm25)")
        if args.retriever == "bm25" and (args.model or args.task):
            parser.error("negatives: --retriever bm25 uses no embedding model: drop --model and --task")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    counts: collections.Counter = collections.Counter()
    start = time.time()
    runner = None
    try:
        if args.command == "negatives" and args.llm is None:
            for flag in ("relabel_positive",):
                if getattr(args, flag):
                    raise ValueError(f"--{flag.replace('_', '-')} needs --llm")
        if args.llm is not None:
            runner = _make_runner(args)
        with JsonlWriter(args.out) as out:
            for record in _pipeline(args, runner, counts):
                out.write(record)
    except (ValueError, FileNotFoundError, FatalLLMError, MissingBM25) as err:
        sys.stderr.write(f"embedder.synth {args.command}: {err}\n")
        return 1
    finally:
        if runner is not None:
            runner.client.close()
            runner.cache.close()
    summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    llm = ""
    if runner is not None:
        where = getattr(runner.cache, "path", None)
        llm = f"; LLM: {runner.summary()}; answers cached in {where or 'memory only'}"
    print(f"{args.command}: wrote {args.out} ({summary}){llm} in {time.time() - start:.1f}s", file=sys.stderr)
    return 0


def _pipeline(args, runner, counts):
    if args.command == "queries":
        passages = _limited(read_passages(args.inp, strict=args.strict, counts=counts), args.limit)
        return generate_queries(passages, runner, task_types=[t.strip() for t in args.task_types.split(",") if t.strip()],
                                queries_per_passage=args.queries_per_passage,
                                params=_params(QUERY_PARAMS, args), counts=counts)
    if args.command == "filter":
        records = _limited(read_pairs(args.inp, strict=args.strict, counts=counts), args.limit)
        return filter_pairs(records, runner, threshold=args.threshold, check_negatives=args.check_negatives,
                            params=_params(FILTER_PARAMS, args), counts=counts)
    if args.command == "classify":
        spec = ClassifySpec.from_json(args.inp)
        return _limited(generate_classification(spec, runner, counts), args.limit)
    return _negatives(args, runner, counts)


def _negatives(args, runner, counts):
    # Imported here: mining needs bm25s or the model's libraries (JAX, scikit-learn), the other commands neither.
    from embedder.synth.negatives import MiningConfig, mine_negatives

    try:
        lo, hi = (int(x) for x in args.rank_window.split(":"))
    except ValueError:
        raise ValueError(f"--rank-window {args.rank_window!r}: expected START:END, e.g. 10:30") from None
    params = {"temperature": 0.0 if args.temperature is None else args.temperature, "max_tokens": 16}
    config = MiningConfig(retriever=args.retriever, num_negatives=args.num_negatives, top_k=args.top_k,
                          rank_window=(lo, hi), duplicate_threshold=args.duplicate_threshold, index=args.index,
                          seed=args.seed, relabel_positive=args.relabel_positive,
                          llm_params=tuple(sorted(params.items())))
    records = list(_limited(read_pairs(args.inp, strict=args.strict, counts=counts), args.limit))
    extra = list(read_passages(args.corpus, strict=args.strict, counts=counts)) if args.corpus else []
    if not records:
        raise ValueError(f"--in {args.inp}: no usable records")
    if args.retriever == "bm25":
        return mine_negatives(records, None, config=config, extra_corpus=extra, runner=runner, miner_name="bm25",
                              counts=counts)
    from embedder import Embedder

    encoder = Embedder.load(args.model)
    return mine_negatives(records, encoder, config=config, task=args.task, extra_corpus=extra, runner=runner,
                          miner_name=os.path.basename(os.path.normpath(args.model)), batch_size=args.batch_size,
                          counts=counts)


def main() -> None:
    sys.exit(run())
