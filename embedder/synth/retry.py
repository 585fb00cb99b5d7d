"""Retry policy for LLM calls: exponential backoff with full jitter, honouring Retry-After."""
from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class RetryableError(Exception):
    """A transient failure (429, 5xx, timeout, dropped connection) worth trying again."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class FatalLLMError(Exception):
    """A failure that retrying cannot fix (bad key, unknown model, malformed request)."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait. Delays are in seconds.

    The wait before retry `n` (0-based) is uniform in [0, min(max_delay, base_delay * 2**n)]
    ("full jitter", so that many workers hitting one rate limit spread out); a
    server's Retry-After, when given, is a lower bound, capped at `max_retry_after`.
    """

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0

    def __post_init__(self):
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"RetryPolicy values must be >= 0, got {self}")

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        backoff = rng.uniform(0.0, min(self.max_delay, self.base_delay * (2.0**attempt)))
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after))
        return backoff


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[int, RetryableError, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` until it succeeds, retrying RetryableError up to policy.max_retries times."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        try:
            return fn()
        except RetryableError as err:
            if attempt >= policy.max_retries:
                raise
            wait = policy.delay(attempt, err.retry_after, rng)
            if on_retry is not None:
                on_retry(attempt, err, wait)
            sleep(wait)
            attempt += 1
