"""Text-identity ids: a 64-bit hash of normalised text, carried as `[..., 2] uint32` for the loss mask.

Normalisation: Unicode NFKC, whitespace runs collapsed to one space, ends stripped; case
is KEPT (case can change meaning, e.g. "US" vs "us", and a false "duplicate" would wrongly
remove a real negative, while a missed duplicate only costs one noisy negative).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Sequence

import numpy as np

_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def text_id(text: str) -> tuple[int, int]:
    """(high, low) 32-bit halves of the 64-bit BLAKE2b hash of the normalised text."""
    digest = hashlib.blake2b(normalise_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:], "big")


def text_ids(texts: Sequence[str]) -> np.ndarray:
    """`[N, 2] uint32` identity ids of `texts`."""
    out = np.zeros((len(texts), 2), dtype=np.uint32)
    for i, t in enumerate(texts):
        out[i] = text_id(t)
    return out


def keyed_text_ids(contexts: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """`[N, 2] uint32` ids of `(context, text)` pairs, both normalised: the same text in another
    context (a query under another task, a document under another title) gets another id."""
    out = np.zeros((len(texts), 2), dtype=np.uint32)
    for i, (c, t) in enumerate(zip(contexts, texts)):
        digest = hashlib.blake2b((normalise_text(c) + "\x00" + normalise_text(t)).encode("utf-8"),
                                 digest_size=8).digest()
        out[i] = int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:], "big")
    return out
