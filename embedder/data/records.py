"""Reading and validating training records (JSONL pairs, BEIR folders) under a bad-record policy.

Every problem is one line `FILE:LINE: what is wrong (how to fix)`; `strict` raises it as
`BadRecordError`, `skip` counts it per reason in a `BadRecordLog`.
"""
from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import pathlib
import zlib

POLICIES = ("strict", "skip")
TEXT_FIELDS = ("query", "positive")


class BadRecordError(ValueError):
    """A bad input record or file; `str(e)` is the one-line `FILE:LINE: problem (fix)` report."""

    def __init__(self, line: str, reason: str = "bad_record"):
        super().__init__(line)
        self.reason = reason


class BadRecordLog:
    """Applies the policy: raise on the first problem (`strict`) or count per reason (`skip`)."""

    def __init__(self, policy: str = "strict"):
        if policy not in POLICIES:
            raise ValueError(f"on_bad_record={policy!r} is unknown; use 'strict' or 'skip'")
        self.policy = policy
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}  # first report line per reason, for the summary
        self.first: tuple[str, str] | None = None  # (reason, line) of the earliest problem

    def report(self, where: str, reason: str, message: str):
        line = f"{where}: {message}"
        if self.policy == "strict":
            raise BadRecordError(line, reason)
        self.counts[reason] += 1
        self.examples.setdefault(reason, line)
        if self.first is None:
            self.first = (reason, line)

    def summary(self) -> str:
        if not self.counts:
            return "no bad records"
        return "skipped bad records: " + ", ".join(
            f"{k}={v} (e.g. {self.examples[k]})" for k, v in sorted(self.counts.items()))


def _open_lines(path: pathlib.Path, log: BadRecordLog):
    """Yields (line_number, raw bytes) of a .jsonl/.jsonl.gz/.tsv file; file problems go to `log`."""
    if not path.exists():
        log.report(str(path), "missing_file", "file not found (fix the path in data_config.datasets)")
        return
    if not path.is_file():
        log.report(str(path), "missing_file", "not a regular file (point the dataset at .jsonl files)")
        return
    opener = gzip.open if path.suffix == ".gz" else open
    empty = True
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    empty = False
                    yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        log.report(str(path), "unreadable_file", f"cannot read file ({e}); re-create or remove it")
        return
    if empty:
        log.report(str(path), "empty_file", "file has no records (remove it from the dataset or fill it)")


def _decode_json(path, lineno, raw, log):
    where = f"{path}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1   # characters, not bytes
        log.report(where, "not_utf8", f"bytes are not UTF-8 at column {column} "
                   "(re-encode the file as UTF-8)")
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        log.report(where, "invalid_json", f"invalid JSON: {e.msg} at column {e.colno} "
                   "(write one JSON object per line)")
        return None
    if not isinstance(obj, dict):
        log.report(where, "wrong_type", f"a line must be a JSON object, got {type(obj).__name__} "
                   '(write {"query": ..., "positive": ...})')
        return None
    return obj


def validate_pair(obj: dict, where: str, log: BadRecordLog, max_text_chars: int) -> dict | None:
    """Checks one record's fields and returns the normalised record, or None when it is bad."""
    for field in TEXT_FIELDS:
        value = obj.get(field)
        if value is None:
            log.report(where, f"missing_{field}", f"missing '{field}' (every record needs a non-empty "
                       f"'{field}' string)")
            return None
        if not isinstance(value, str):
            log.report(where, "wrong_type", f"'{field}' is {type(value).__name__}, expected a string (quote the text)")
            return None
        if not value.strip():
            log.report(where, f"empty_{field}", f"'{field}' is empty (give it text or drop the record)")
            return None
    negatives = obj.get("negatives")
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        log.report(where, "wrong_type", "'negatives' must be a list of strings (write [\"...\", ...] or drop the field)")
        return None
    negatives = [n for n in negatives if n.strip()]
    for field in ("task", "title"):
        if obj.get(field) is not None and not isinstance(obj[field], str):
            log.report(where, "wrong_type", f"'{field}' is {type(obj[field]).__name__}, expected a string "
                       "(give a string or drop the field)")
            return None
    for field, value in [("query", obj["query"]), ("positive", obj["positive"])] + [
            (f"negatives[{i}]", n) for i, n in enumerate(negatives)] + [("title", obj.get("title") or "")]:
        if len(value) > max_text_chars:
            log.report(where, "text_too_long", f"'{field}' has {len(value)} characters > max_text_chars="
                       f"{max_text_chars} (shorten it or raise data_config.max_text_chars)")
            return None
    return {"query": obj["query"], "positive": obj["positive"], "negatives": negatives,
            "task": obj.get("task") or "", "title": obj.get("title") or ""}


def read_jsonl_pairs(files, log: BadRecordLog, max_text_chars: int):
    """Yields (key, record) for every valid record of JSONL(.gz) `files`; keys are
    `FILE_INDEX:LINE` (the file's place in `files`), not its path: TFDS orders a prepared
    dataset by a hash of the keys, and moving or renaming the data must not change that order."""
    if isinstance(files, (str, pathlib.Path)):
        files = [files]
    for index, path in enumerate(map(pathlib.Path, files)):
        for lineno, raw in _open_lines(path, log):
            where = f"{path}:{lineno}"
            obj = _decode_json(path, lineno, raw, log)
            if obj is None:
                continue
            record = validate_pair(obj, where, log, max_text_chars)
            if record is not None:
                yield f"{index}:{lineno}", record


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (directory / name).exists():
            return directory / name
    return directory / f"{stem}.jsonl"


def _read_beir_table(path, key_field, fields, log):
    table = {}
    for lineno, raw in _open_lines(path, log):
        obj = _decode_json(path, lineno, raw, log)
        if obj is None:
            continue
        key = obj.get(key_field)
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            log.report(f"{path}:{lineno}", "wrong_type", f"'{key_field}' must be a string id (give every line an id)")
            continue
        if not all(isinstance(obj.get(f, ""), str) for f in fields):
            log.report(f"{path}:{lineno}", "wrong_type", f"fields {list(fields)} must be strings (quote the text)")
            continue
        table[str(key)] = {f: obj.get(f, "") or "" for f in fields}
    return table


def read_beir_pairs(directory, split: str, log: BadRecordLog, max_text_chars: int):
    """Yields (key, record) training pairs from a BEIR folder (corpus, queries, qrels/SPLIT.tsv).

    A qrel with score > 0 makes a (query, document) pair; the query's judged documents with
    score <= 0 become its hard negatives. The document title goes to the record's `title`.
    """
    directory = pathlib.Path(directory)
    corpus = _read_beir_table(_find(directory, "corpus"), "_id", ("title", "text"), log)
    queries = _read_beir_table(_find(directory, "queries"), "_id", ("text",), log)
    qrels_path = directory / "qrels" / f"{split}.tsv"
    positives, negatives = collections.defaultdict(list), collections.defaultdict(list)
    rows = list(_open_lines(qrels_path, log))
    for i, (lineno, raw) in enumerate(rows):
        where = f"{qrels_path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            log.report(where, "not_utf8", "bytes are not UTF-8 (re-encode the file as UTF-8)")
            continue
        cells = next(csv.reader(io.StringIO(line), delimiter="\t"))
        if i == 0 and cells[:1] == ["query-id"]:
            continue
        if len(cells) < 3:
            log.report(where, "invalid_qrel", "too few columns (write 'query-id<TAB>corpus-id<TAB>score')")
            continue
        qid, did, score = cells[0].strip(), cells[1].strip(), cells[2].strip()
        try:
            score = float(score)
        except ValueError:
            log.report(where, "invalid_qrel", f"score {score!r} is not a number (use an integer relevance grade)")
            continue
        if qid not in queries:
            log.report(where, "unknown_id", f"query id {qid!r} is not in {_find(directory, 'queries').name} "
                       "(add the query or drop the qrel)")
            continue
        if did not in corpus:
            log.report(where, "unknown_id", f"corpus id {did!r} is not in {_find(directory, 'corpus').name} "
                       "(add the document or drop the qrel)")
            continue
        (positives if score > 0 else negatives)[qid].append((where, did))
    for qid, docs in positives.items():
        neg_texts = [corpus[d]["text"] for _, d in negatives.get(qid, [])]
        for where, did in docs:
            doc = corpus[did]
            record = validate_pair({"query": queries[qid]["text"], "positive": doc["text"],
                                    "title": doc["title"], "negatives": neg_texts}, where, log, max_text_chars)
            if record is not None:
                yield where, record
