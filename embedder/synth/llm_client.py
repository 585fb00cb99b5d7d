"""The LLM client interface every backend implements (`embedder.synth.clients` picks one)."""
from __future__ import annotations

import abc
import urllib.parse
from typing import Mapping, Sequence

Message = Mapping[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


def server_id(url: str) -> str:
    """`url` without credentials, query or fragment (`scheme://host:port/path`): which server
    answers, as the answer cache records it, never a secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class LLMClient(abc.ABC):
    """One chat model behind one backend. `complete` makes exactly one attempt.

    Implementations raise `retry.RetryableError` for transient failures and
    `retry.FatalLLMError` for the rest; retries, caching and concurrency live
    in `runner.LLMRunner`, so a backend stays a thin translation layer.
    Implementations must be safe to call from several threads.
    """

    backend: str
    model: str
    server: str = ""   # the endpoint that answers (`server_id`), part of the answer cache's key

    @abc.abstractmethod
    def complete(self, messages: Sequence[Message], params: Mapping[str, object]) -> str:
        """Return the assistant's text for `messages` under sampling `params`.

        Known params: temperature, top_p, max_tokens, seed.
        """

    def close(self) -> None:
        """Release connections."""

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.model}"

    def __repr__(self) -> str:
        # Never include the key: reprs end up in logs and tracebacks.
        return f"{type(self).__name__}({self.name!r})"
