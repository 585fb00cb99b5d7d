"""Whether a failure to read a checkpoint step proves the step corrupt, or may pass on a retry."""
from __future__ import annotations

import json

# Tensorstore (under Orbax) raises ValueError("CODE: ...") with an absl status code. These
# three mean the store answered and its bytes are missing (NOT_FOUND), shorter than the array
# metadata declares (OUT_OF_RANGE) or fail to decode or checksum (DATA_LOSS). Other codes
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) may pass on a retry.
_CORRUPT_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")


class StepCorrupt(Exception):
    """A step proven incomplete or corrupt; the message says why."""


class CheckpointReadError(RuntimeError):
    """A checkpoint step could not be read although nothing proves it corrupt (retried, then given up)."""


def describe(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters of message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def corruption(exc: BaseException) -> str | None:
    """What `exc`, raised while reading a step, proves wrong with it; None when it may be transient."""
    if isinstance(exc, StepCorrupt):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"missing file {exc.filename or exc}"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"unparsable file: {describe(exc)}"
    if isinstance(exc, ValueError) and str(exc).split(":", 1)[0].strip() in _CORRUPT_CODES:
        return f"array data does not match its metadata: {describe(exc)}"
    return None   # OSError (EIO, timeouts, stale handles), memory pressure, anything unproven
