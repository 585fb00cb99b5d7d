"""Disk cache of LLM answers (sqlite), keyed by server, backend, model, messages and sampling parameters."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from typing import Mapping, Sequence

from embedder.synth.llm_client import Message


def cache_key(backend: str, model: str, messages: Sequence[Message], params: Mapping[str, object],
              server: str = "") -> str:
    """A stable hash of everything that determines an answer: the server (`llm_client.server_id`
    of its URL: the same model name elsewhere is another model), backend, model, prompt messages
    and sampling parameters; never the API key."""
    payload = json.dumps(
        {"server": server, "backend": backend, "model": model, "messages": [dict(m) for m in messages],
         "params": dict(params)},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers stored as soon as they arrive, so an interrupted job resumes where it stopped.

    One sqlite file in WAL mode; each `put` commits, so a killed process loses at
    most the request in flight. Safe for the runner's worker threads.
    """

    def __init__(self, directory: str | os.PathLike):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(os.fspath(directory), "llm_cache.sqlite")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, created REAL)"
            )
            self._db.commit()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, answer: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, model, answer, created) VALUES (?, ?, ?, ?)",
                (key, model, answer, time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class MemoryCache:
    """Same interface, in memory: for runs with --no-cache (answers still deduplicated)."""

    def __init__(self):
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: str, model: str, answer: str) -> None:
        with self._lock:
            self._data[key] = answer

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        pass
