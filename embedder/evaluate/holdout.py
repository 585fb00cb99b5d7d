"""A validation retrieval task held out of a training-pairs file, disjoint from training by group.

Choices (learning rate, steps, which run to export, greedy soup selection) are made on it, so
the test tasks are only ever reported. Records are split by *group* (a package, a source
family, a web domain: the caller's key), never by row: all rows of a held-out group leave the
training side, and so does any training row whose query or positive text equals a held-out
one. A group's side is a seeded SHA-256 of its key, the same on every machine and Python.

    python -m embedder.evaluate.holdout PAIRS.jsonl[.gz] OUT_DIR [--queries 400 --corpus 2000]

writes `OUT_DIR/{corpus,queries}.jsonl`, `qrels/test.tsv` and `task.json` (the BEIR layout
`load_task` reads).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import re
import sys
from typing import Callable, Iterable, Sequence

from embedder.data.jsonl import iter_jsonl

# Debian binary packages of one source family: lib*/python3-*/...-dev/-doc/... variants.
_PREFIXES = re.compile(r"^(python3?|pypy|ruby|node|golang|libghc|r-cran|r-bioc|php|lua[0-9.]*|libjs|fonts|"
                       r"gir1\.2|texlive|elpa|haskell|librust|ocaml|tcl|gnome-shell-extension)-")
_SUFFIXES = re.compile(r"(-(dev|doc|docs|data|common|bin|dbg|utils|tools|examples|tests?|plugins?|runtime|java|"
                       r"perl|ocaml|cil|headers|source|src|l10n|i18n|locales?|el|emacs))+$")


class HoldoutError(ValueError):
    """Too few records or groups for the task asked for (the message says how many there are)."""


def package_family(package: str) -> str:
    """A conservative family key of a Debian binary package name: language prefixes, `lib`,
    `-dev`/`-doc`/... suffixes and trailing version numbers removed (`libfoo2-dev`, `foo-doc`
    and `python3-foo` all give `foo`). Over-merging only moves more rows to one side."""
    key = package.lower()
    key = _PREFIXES.sub("", key)
    previous = None
    while key != previous and key:
        previous = key
        key = _SUFFIXES.sub("", key)
        key = re.sub(r"^lib(?=.)", "", key)
        key = re.sub(r"t64$", "", key)
        if len(key) > 3:
            key = re.sub(r"[-.]?[0-9]+(\.[0-9]+)*[a-z]?$", "", key) or key
    return key or package.lower()


def is_held_out(group: str, fraction: float, seed: int = 0) -> bool:
    """Whether `group` is on the validation side: sha256(f"{seed}:{group}") below `fraction`."""
    digest = hashlib.sha256(f"{int(seed)}:{group}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


def normalize_text(text: str) -> str:
    """Lower-cased, whitespace-collapsed: the form in which two texts count as the same."""
    return " ".join(text.lower().split())


@dataclasses.dataclass
class Holdout:
    """The split: `train` records (input order kept), the task's corpus / queries / qrels, and counts."""

    train: list[dict]
    corpus: list[dict]
    queries: list[dict]
    qrels: dict[str, str]
    stats: dict


def holdout_retrieval(records: Sequence[dict], *, group: Callable[[dict], str], num_queries: int = 400,
                      corpus_size: int = 2000, seed: int = 0, query_field: str = "query",
                      document_field: str = "positive") -> Holdout:
    """Holds out whole groups until the corpus has `corpus_size` documents (one per group: near-
    duplicate variants of a group never compete with each other), then picks `num_queries` of
    them as queries. Every other record, minus those sharing a query or document text with the
    held-out side, stays for training."""
    if num_queries < 1 or corpus_size < num_queries:
        raise HoldoutError(f"need 1 <= num_queries ({num_queries}) <= corpus_size ({corpus_size})")
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        for f in (query_field, document_field):
            if not isinstance(r.get(f), str) or not r[f].strip():
                raise HoldoutError(f"record {i + 1} has no text in field {f!r}; each record needs "
                                   f"{query_field!r} and {document_field!r}")
        by_group.setdefault(str(group(r)), []).append(i)
    # Groups in a seeded hash order: the held-out side is a prefix of it, so a larger corpus
    # keeps every group of a smaller one.
    order = sorted(by_group, key=lambda g: hashlib.sha256(f"{int(seed)}:{g}".encode("utf-8")).digest())
    corpus, queries, qrels, held_groups = [], [], {}, []
    seen_docs: set[str] = set()
    for g in order:
        if len(corpus) >= corpus_size:
            break
        held_groups.append(g)
        rows = by_group[g]
        # The group's document: the row with the lowest seeded hash of its texts (order-free).
        pick = min(rows, key=lambda i: hashlib.sha256(
            f"{int(seed)}:{records[i][query_field]}\n{records[i][document_field]}".encode("utf-8")).digest())
        doc = records[pick][document_field]
        if normalize_text(doc) in seen_docs:
            continue
        seen_docs.add(normalize_text(doc))
        doc_id = f"d{len(corpus)}"
        corpus.append({"_id": doc_id, "title": "", "text": doc, "group": g})
        queries.append({"_id": f"q{len(corpus) - 1}", "text": records[pick][query_field], "group": g,
                        "doc": doc_id})
    if len(corpus) < corpus_size:
        raise HoldoutError(f"{len(records)} records in {len(by_group)} groups give only {len(corpus)} distinct "
                           f"documents, fewer than corpus_size={corpus_size}")
    # Queries: an evenly spread subset of the held-out groups (one query per group, distinct texts).
    step = len(queries) / num_queries
    chosen, seen_queries = [], set()
    for k in range(num_queries):
        q = queries[int(k * step)]
        if normalize_text(q["text"]) not in seen_queries:
            seen_queries.add(normalize_text(q["text"]))
            chosen.append(q)
    qrels = {q["_id"]: q.pop("doc") for q in chosen}
    held = set(held_groups)
    held_texts = {normalize_text(records[i][f]) for g in held for i in by_group[g] for f in (query_field, document_field)}
    train, dropped_text = [], 0
    for i, r in enumerate(records):
        if str(group(r)) in held:
            continue
        if normalize_text(r[query_field]) in held_texts or normalize_text(r[document_field]) in held_texts:
            dropped_text += 1
            continue
        train.append(r)
    stats = {"records": len(records), "groups": len(by_group), "held_out_groups": len(held),
             "held_out_records": sum(len(by_group[g]) for g in held), "corpus": len(corpus),
             "queries": len(chosen), "train_records": len(train),
             "train_dropped_for_shared_text": dropped_text, "seed": int(seed)}
    return Holdout(train=train, corpus=corpus, queries=chosen, qrels=qrels, stats=stats)


def write_task(holdout: Holdout, out: pathlib.Path, *, name: str = "ValidationRetrieval",
               prompt: str = "search result") -> pathlib.Path:
    """The task in the BEIR layout (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`, `task.json`,
    and `holdout.json` with the counts); files are written whole, then renamed."""
    out = pathlib.Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)

    def put(path: pathlib.Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    put(out / "corpus.jsonl", "".join(json.dumps(d) + "\n" for d in holdout.corpus))
    put(out / "queries.jsonl", "".join(json.dumps(q) + "\n" for q in holdout.queries))
    put(out / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" +
        "".join(f"{q}\t{d}\t1\n" for q, d in holdout.qrels.items()))
    put(out / "holdout.json", json.dumps(holdout.stats, indent=1) + "\n")
    put(out / "task.json", json.dumps({"type": "retrieval", "name": name, "prompt": prompt}, indent=1) + "\n")
    return out


def read_records(paths: Iterable[pathlib.Path]) -> list[dict]:
    return [r for p in paths for _, r in iter_jsonl(pathlib.Path(p))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Hold a validation retrieval task out of training pairs, by group.")
    p.add_argument("pairs", type=pathlib.Path, nargs="+", help="JSONL(.gz) pair files (query, positive, ...)")
    p.add_argument("out", type=pathlib.Path, help="task folder to write")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--corpus", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-field", default="package",
                   help="record field naming the group (default: package); records without it form their own group")
    p.add_argument("--debian-families", action="store_true",
                   help="group Debian binary packages of one family (libfoo-dev, python3-foo, foo-doc -> foo)")
    p.add_argument("--train-out", type=pathlib.Path, help="also write the training records left (JSONL)")
    args = p.parse_args(argv)
    records = read_records(args.pairs)

    def group(r: dict) -> str:
        key = str(r.get(args.group_field) or r.get("query"))
        return package_family(key) if args.debian_families else key

    try:
        h = holdout_retrieval(records, group=group, num_queries=args.queries, corpus_size=args.corpus,
                              seed=args.seed)
    except HoldoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_task(h, args.out)
    if args.train_out:
        args.train_out.write_text("".join(json.dumps(r) + "\n" for r in h.train), encoding="utf-8")
    print(json.dumps(h.stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
