"""Read training records (design.md format, Debian pairs, BEIR corpora) and write JSONL outputs."""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator

from embedder.data.jsonl import iter_jsonl, open_text  # noqa: F401  (open_text re-exported)

log = logging.getLogger("embedder.synth")


class RecordError(ValueError):
    """A bad input line, named by file and line number."""


def read_jsonl(path: str | os.PathLike, *, strict: bool = False, counts: dict | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); bad lines raise (strict) or are logged and counted as `bad_lines`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--in {os.fspath(path)!r} does not exist")

    def bad(message):
        if strict:
            raise RecordError(message + " (fix the line or drop --strict to skip bad lines)")
        log.warning("skipping bad line %s", message)
        if counts is not None:
            counts["bad_lines"] = counts.get("bad_lines", 0) + 1

    yield from iter_jsonl(path, on_error=bad)


def normalise_pair(obj: dict, where: str) -> dict:
    """A design.md record (query, positive, negatives?, task?, title?) from any supported input.

    Debian pairs (query, positive, package, section) get the package as title;
    extra fields are kept so provenance survives.
    """
    query, positive = obj.get("query"), obj.get("positive")
    if not isinstance(query, str) or not query.strip() or not isinstance(positive, str) or not positive.strip():
        raise RecordError(f"{where}: needs non-empty string fields 'query' and 'positive'")
    rec = dict(obj)
    negatives = rec.get("negatives")
    if negatives is not None and (not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives)):
        raise RecordError(f"{where}: 'negatives' must be a list of strings")
    if "title" not in rec and isinstance(obj.get("package"), str):
        rec["title"] = obj["package"]
    return rec


def read_pairs(path: str | os.PathLike, *, strict: bool = False, counts: dict | None = None) -> Iterator[dict]:
    """Query/positive records; invalid ones raise (strict) or are skipped and counted as `bad_records`."""
    for lineno, obj in read_jsonl(path, strict=strict, counts=counts):
        try:
            yield normalise_pair(obj, f"{os.fspath(path)}:{lineno}")
        except RecordError as err:
            if strict:
                raise
            log.warning("skipping record: %s", err)
            if counts is not None:
                counts["bad_records"] = counts.get("bad_records", 0) + 1


def read_passages(path: str | os.PathLike, *, strict: bool = False, counts: dict | None = None) -> Iterator[dict]:
    """Unique passages as {"text", "title", "id"} from pair records (`positive`) or corpora (`text`)."""
    seen: set[str] = set()
    for lineno, obj in read_jsonl(path, strict=strict, counts=counts):
        text = obj.get("positive", obj.get("text"))
        if not isinstance(text, str) or not text.strip():
            msg = f"{os.fspath(path)}:{lineno}: needs a non-empty 'positive' (pairs) or 'text' (corpus) field"
            if strict:
                raise RecordError(msg)
            log.warning("skipping record: %s", msg)
            if counts is not None:
                counts["bad_records"] = counts.get("bad_records", 0) + 1
            continue
        if text in seen:
            continue
        seen.add(text)
        title = obj.get("title") or obj.get("package") or ""
        yield {"text": text, "title": title, "id": str(obj.get("_id", obj.get("id", lineno)))}


class JsonlWriter:
    """Writes one JSON object a line (gzip for .gz), flushed per record so partial runs are readable."""

    def __init__(self, path: str | os.PathLike):
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.path = os.fspath(path)
        self._f = open_text(self.path, "w")
        self.count = 0

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
