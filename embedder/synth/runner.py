"""Run many LLM requests: bounded concurrency, retries, disk cache, ordered results, counters."""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import random
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

from embedder.synth.cache import MemoryCache, ResponseCache, cache_key
from embedder.synth.llm_client import LLMClient, Message
from embedder.synth.retry import RetryableError, RetryPolicy, call_with_retries

log = logging.getLogger("embedder.synth")


@dataclasses.dataclass(frozen=True)
class LLMRequest:
    """One prompt. `tag` travels with the answer (the caller's bookkeeping, not sent)."""

    messages: Sequence[Message]
    params: Mapping[str, object]
    tag: Any = None


@dataclasses.dataclass
class LLMResult:
    request: LLMRequest
    answer: str | None  # None: every attempt failed
    cached: bool = False
    error: str | None = None


class LLMRunner:
    """Sends requests through one client with at most `concurrency` in flight.

    Answers come back in request order (so outputs are reproducible) while up to
    `concurrency` requests run; each answer is written to the cache the moment it
    arrives. Requests that still fail after the retry policy are counted and
    yielded with `answer=None`; a FatalLLMError (bad key, unknown model) stops the run.
    """

    def __init__(
        self,
        client: LLMClient,
        cache: ResponseCache | MemoryCache | None = None,
        *,
        concurrency: int = 8,
        retry: RetryPolicy = RetryPolicy(),
        seed: int = 0,
    ):
        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        self.client = client
        self.cache = cache if cache is not None else MemoryCache()
        self.concurrency = concurrency
        self.retry = retry
        self.stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()
        self._rng = random.Random(seed)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _call(self, request: LLMRequest, key: str) -> LLMResult:
        def on_retry(attempt: int, err: RetryableError, wait: float) -> None:
            self._count("retries")
            log.warning("LLM %s: %s; retry %d in %.2fs", self.client.name, err, attempt + 1, wait)

        def attempt() -> str:
            self._count("requests")
            return self.client.complete(request.messages, request.params)

        try:
            answer = call_with_retries(attempt, self.retry, on_retry=on_retry, rng=random.Random(self._rng.random()))
        except RetryableError as err:
            self._count("failed")
            log.warning("LLM %s: giving up after %d retries: %s", self.client.name, self.retry.max_retries, err)
            return LLMResult(request, None, error=str(err))
        self.cache.put(key, self.client.name, answer)
        self._count("answered")
        return LLMResult(request, answer)

    def run(self, requests: Iterable[LLMRequest]) -> Iterator[LLMResult]:
        """Yield one LLMResult per request, in order."""
        window = self.concurrency * 4  # enough look-ahead that one slow answer rarely stalls the pool
        pending: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="llm") as pool:
            try:
                for request in requests:
                    key = cache_key(self.client.backend, self.client.model, request.messages, request.params,
                                    server=self.client.server)
                    hit = self.cache.get(key)
                    if hit is not None:
                        self._count("cache_hits")
                        pending.append(LLMResult(request, hit, cached=True))
                    else:
                        pending.append(pool.submit(self._call, request, key))
                    while len(pending) > window or (pending and not isinstance(pending[0], concurrent.futures.Future)):
                        yield _resolve(pending.popleft())
                while pending:
                    yield _resolve(pending.popleft())
            finally:
                for item in pending:
                    if isinstance(item, concurrent.futures.Future):
                        item.cancel()

    def complete_all(self, requests: Sequence[LLMRequest]) -> list[LLMResult]:
        return list(self.run(requests))

    def summary(self) -> str:
        keys = ("requests", "answered", "cache_hits", "retries", "failed")
        return ", ".join(f"{k}={self.stats.get(k, 0)}" for k in keys)


def _resolve(item) -> LLMResult:
    # A FatalLLMError raised in a worker re-raises here and ends the run.
    return item.result() if isinstance(item, concurrent.futures.Future) else item
