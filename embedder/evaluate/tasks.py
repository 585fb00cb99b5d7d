"""Evaluation task directories (BEIR / MTEB layouts): reading, validating, type inference.

Layouts (every `.jsonl` may also be `.jsonl.gz`):

- retrieval: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/test.tsv` (`query-id<TAB>corpus-id<TAB>score`, header line);
- classification: `train.jsonl`, `test.jsonl` (`text`, `label`);
- clustering: `test.jsonl` (`text`, `label`);
- sts: `test.jsonl` (`sentence1`, `sentence2`, `score`);
- pair_classification: `test.jsonl` (`sentence1`, `sentence2`, `label` in {0, 1});
- reranking: `test.jsonl` (`query`, `positive`: [str], `negative`: [str]), as MTEB's
  AskUbuntu / SciDocs reranking sets;
- bitext_mining: `test.jsonl` (`sentence1`, `sentence2`: row i's sentence2 translates its
  sentence1), as MTEB's bitext mining sets.

An optional `task.json` holds `{"type", "name", "prompt"}`; without it the type is
inferred from the files, the name is the folder name and the prompt is the default
task string of the type (EmbeddingGemma's task names).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from typing import Any

from embedder.data.jsonl import iter_jsonl

TASK_TYPES = ("retrieval", "classification", "clustering", "sts", "pair_classification", "reranking",
              "bitext_mining")

# EmbeddingGemma task strings ("task: {prompt} | query: ...") used when task.json names none.
DEFAULT_PROMPTS = {
    "retrieval": "search result",
    "classification": "classification",
    "clustering": "clustering",
    "sts": "sentence similarity",
    "pair_classification": "sentence similarity",
    "reranking": "search result",
    "bitext_mining": "sentence similarity",  # as mteb_adapter.TASK_TYPE_PROMPTS["BitextMining"]
}


class TaskFormatError(ValueError):
    """A task directory or file does not follow the documented layout."""


@dataclasses.dataclass
class Task:
    """A loaded evaluation task; `data` holds the type's fields (see `load_task`)."""

    name: str
    type: str
    prompt: str
    path: pathlib.Path | None
    data: dict[str, Any]


def find_jsonl(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        candidate = directory / (stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """All records of a `.jsonl` / `.jsonl.gz` file; a bad line raises with file and line."""
    def bad(message):
        raise TaskFormatError(f"{message}; each line must be one JSON object")

    return [record for _, record in iter_jsonl(path, on_error=bad)]


def _require(records: list[dict], path: pathlib.Path, fields: tuple[str, ...]) -> None:
    for i, record in enumerate(records, 1):
        missing = [f for f in fields if f not in record]
        if missing:
            raise TaskFormatError(f"{path}: record {i} lacks field(s) {missing}; records need {list(fields)}")


def read_qrels(path: pathlib.Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV (`query-id corpus-id score`, header line) -> {qid: {doc_id: score}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise TaskFormatError(f"{path}: empty qrels file; expected a header and 'query-id<TAB>corpus-id<TAB>score' rows")
    start = 1 if rows[0] and rows[0][0].strip().lower() in ("query-id", "query_id", "qid") else 0
    for lineno, row in enumerate(rows[start:], start + 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 3:
            raise TaskFormatError(f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), got {row!r}")
        try:
            score = int(float(row[2]))
        except ValueError:
            raise TaskFormatError(f"{path}:{lineno}: score {row[2]!r} is not a number") from None
        qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def infer_task_type(directory: pathlib.Path) -> str:
    """Task type from the files present (and, for `test.jsonl`, its first record's fields)."""
    directory = pathlib.Path(directory)
    if find_jsonl(directory, "corpus") and find_jsonl(directory, "queries"):
        return "retrieval"
    test = find_jsonl(directory, "test")
    if test is None:
        raise TaskFormatError(
            f"{directory}: cannot tell the task type: no corpus.jsonl+queries.jsonl (retrieval) and no test.jsonl; "
            f"see embedder/evaluate/tasks.py for the layouts, or add task.json with a 'type' among {list(TASK_TYPES)}"
        )
    if find_jsonl(directory, "train"):
        return "classification"
    records = read_jsonl(test)
    if not records:
        raise TaskFormatError(f"{test}: no records")
    keys = set(records[0])
    if {"query", "positive", "negative"} <= keys:
        return "reranking"
    if {"sentence1", "sentence2"} <= keys:
        if "score" in keys:
            return "sts"
        return "pair_classification" if keys & {"label", "labels"} else "bitext_mining"
    if {"text", "label"} <= keys:
        return "clustering"
    raise TaskFormatError(f"{test}: cannot tell the task type from fields {sorted(keys)}; add task.json with a 'type'")


def _need(directory: pathlib.Path, stem: str) -> pathlib.Path:
    path = find_jsonl(directory, stem)
    if path is None:
        raise TaskFormatError(f"{directory}: missing {stem}.jsonl (or {stem}.jsonl.gz)")
    return path


def _load_retrieval(directory: pathlib.Path) -> dict:
    corpus_path, queries_path = _need(directory, "corpus"), _need(directory, "queries")
    qrels_path = directory / "qrels" / "test.tsv"
    if not qrels_path.is_file():
        raise TaskFormatError(f"{directory}: missing qrels/test.tsv (query-id<TAB>corpus-id<TAB>score, header line)")
    corpus = read_jsonl(corpus_path)
    _require(corpus, corpus_path, ("_id", "text"))
    queries = read_jsonl(queries_path)
    _require(queries, queries_path, ("_id", "text"))
    qrels = read_qrels(qrels_path)
    known_docs = {str(d["_id"]) for d in corpus}
    known_queries = {str(q["_id"]) for q in queries}
    unknown = [q for q in qrels if q not in known_queries]
    if unknown:
        raise TaskFormatError(f"{qrels_path}: query ids {unknown[:3]} are not in {queries_path.name}")
    for qid, docs in qrels.items():
        for doc in docs:
            if doc not in known_docs:
                raise TaskFormatError(f"{qrels_path}: corpus id {doc!r} (query {qid!r}) is not in {corpus_path.name}")
    # BEIR evaluates only the queries that have judgements.
    queries = [q for q in queries if str(q["_id"]) in qrels]
    return {
        "corpus_ids": [str(d["_id"]) for d in corpus],
        "corpus_texts": [d["text"] for d in corpus],
        "corpus_titles": [d.get("title") or None for d in corpus],
        "query_ids": [str(q["_id"]) for q in queries],
        "query_texts": [q["text"] for q in queries],
        "qrels": qrels,
    }


def _load_labelled(path: pathlib.Path) -> dict:
    records = read_jsonl(path)
    _require(records, path, ("text", "label"))
    return {"texts": [r["text"] for r in records], "labels": [r["label"] for r in records]}


def _load_pairs(path: pathlib.Path, target: str) -> dict:
    records = read_jsonl(path)
    if target == "label" and records and "label" not in records[0] and "labels" in records[0]:
        target = "labels"
    _require(records, path, ("sentence1", "sentence2", target))
    values = []
    for i, r in enumerate(records, 1):
        try:
            values.append(float(r[target]))
        except (TypeError, ValueError):
            raise TaskFormatError(f"{path}: record {i}: {target}={r[target]!r} is not a number") from None
    return {"sentence1": [r["sentence1"] for r in records], "sentence2": [r["sentence2"] for r in records],
            "scores" if target == "score" else "labels": values}


def _load_bitext(path: pathlib.Path) -> dict:
    records = read_jsonl(path)
    _require(records, path, ("sentence1", "sentence2"))
    if not records:
        raise TaskFormatError(f"{path}: no sentence pairs")
    return {"sentence1": [r["sentence1"] for r in records], "sentence2": [r["sentence2"] for r in records]}


def _load_reranking(path: pathlib.Path) -> dict:
    records = read_jsonl(path)
    _require(records, path, ("query", "positive", "negative"))
    for i, r in enumerate(records, 1):
        if not isinstance(r["positive"], list) or not isinstance(r["negative"], list):
            raise TaskFormatError(f"{path}: record {i}: 'positive' and 'negative' must be lists of strings")
    return {"queries": [r["query"] for r in records], "positives": [r["positive"] for r in records],
            "negatives": [r["negative"] for r in records]}


def load_task(path) -> Task:
    """Load a task directory; errors say which file or field is wrong and how to fix it."""
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise TaskFormatError(f"task directory {str(directory)!r} does not exist or is not a directory")
    meta = {}
    meta_path = directory / "task.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{meta_path}: not valid JSON ({e.msg})") from None
        if not isinstance(meta, dict):
            raise TaskFormatError(f"{meta_path}: expected an object with 'type', 'name', 'prompt'")
    task_type = meta.get("type") or infer_task_type(directory)
    if task_type not in TASK_TYPES:
        raise TaskFormatError(f"{meta_path}: unknown task type {task_type!r}; use one of {list(TASK_TYPES)}")
    if task_type == "retrieval":
        data = _load_retrieval(directory)
    elif task_type == "classification":
        data = {"train": _load_labelled(_need(directory, "train")), "test": _load_labelled(_need(directory, "test"))}
    elif task_type == "clustering":
        data = _load_labelled(_need(directory, "test"))
    elif task_type == "sts":
        data = _load_pairs(_need(directory, "test"), "score")
    elif task_type == "pair_classification":
        data = _load_pairs(_need(directory, "test"), "label")
    elif task_type == "bitext_mining":
        data = _load_bitext(_need(directory, "test"))
    else:
        data = _load_reranking(_need(directory, "test"))
    name = meta.get("name") or directory.name
    prompt = meta.get("prompt") or DEFAULT_PROMPTS[task_type]
    return Task(name=name, type=task_type, prompt=prompt, path=directory, data=data)
