"""The LLM client interface every backend implements (`embedder.synth.clients` picks one)."""
from __future__ import annotations

import abc
from typing import Mapping, Sequence

Message = Mapping[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


class LLMClient(abc.ABC):
    """One chat model behind one backend. `complete` makes exactly one attempt.

    Implementations raise `retry.RetryableError` for transient failures and
    `retry.FatalLLMError` for the rest; retries, caching and concurrency live
    in `runner.LLMRunner`, so a backend stays a thin translation layer.
    Implementations must be safe to call from several threads.
    """

    backend: str
    model: str

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
