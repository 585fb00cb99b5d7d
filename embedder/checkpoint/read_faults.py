"""Whether a failure to read a checkpoint step proves the step corrupt, or may pass on a retry."""
from __future__ import annotations

import json

# Tensorstore (under Orbax) raises ValueError("CODE: ...") with an absl status code. These
# three mean the store answered and its bytes are missing (NOT_FOUND), shorter than the array
# metadata declares (OUT_OF_RANGE) or fail to decode or checksum (DATA_LOSS). Other codes
# (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) may pass on a retry.
_CORRUPT_CODES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
# Codes of a store that did not answer properly: I/O errors, like OSError.
_IO_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "INTERNAL",
             "UNKNOWN")


class StepCorrupt(Exception):
    """A step proven incomplete or corrupt; the message says why."""


class CheckpointReadError(RuntimeError):
    """A checkpoint step could not be read although nothing proves it corrupt (retried, then given up)."""


def describe(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, at most `limit` characters of message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _code(exc: BaseException) -> str:
    return str(exc).split(":", 1)[0].strip() if isinstance(exc, ValueError) else ""


def is_io_error(exc: BaseException) -> bool:
    """Whether `exc` is an I/O failure that a retry may cure (OSError, or a store's transient
    status); anything else raised while reading is a programming error and is never retried."""
    return isinstance(exc, OSError) or _code(exc) in _IO_CODES


def corruption(exc: BaseException) -> str | None:
    """What `exc`, raised while reading a step, says is wrong with it; None when it says nothing
    about the step. A missing file may be a passing fault of a FUSE / NFS mount: the caller counts
    it (as any of these) as proof only when a second read after a back-off finds the same."""
    if isinstance(exc, StepCorrupt):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"missing file {exc.filename or exc}"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"unparsable file: {describe(exc)}"
    if _code(exc) in _CORRUPT_CODES:
        return f"array data does not match its metadata: {describe(exc)}"
    return None   # OSError (EIO, timeouts, stale handles), memory pressure, anything unproven
