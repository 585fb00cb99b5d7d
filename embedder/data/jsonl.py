"""Line-numbered reading of `.jsonl` / `.jsonl.gz` files, shared by every module that takes JSONL.

(The training-data reader `embedder.data.records` works on raw bytes with its own
bad-record policy and TSV support; everything else reads through here.)
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import IO, Callable, Iterator


class JsonlError(ValueError):
    """A line that is not one JSON object, named `PATH:LINE: problem`."""


def open_text(path: str | os.PathLike, mode: str = "r") -> IO[str]:
    """Opens `.jsonl` or `.jsonl.gz` (by suffix) for UTF-8 text reading or writing."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, mode.replace("t", "") + "b"), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike, *,
               on_error: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yields `(line number, object)` for every non-blank line of `path`.

    A line that is not a JSON object is passed to `on_error` as `"PATH:LINE: problem"`
    (the caller raises its own error type or skips and counts it); without
    `on_error` it raises `JsonlError`.
    """
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                # Without the newline: a fault at the end of the line is at its last column + 1,
                # not at column 1 of a second line of the string.
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"   # colno: characters, from 1
            else:
                if isinstance(obj, dict):
                    yield lineno, obj
                    continue
                problem = f"expected a JSON object, got {type(obj).__name__}"
            message = f"{os.fspath(path)}:{lineno}: {problem}"
            if on_error is None:
                raise JsonlError(message)
            on_error(message)
