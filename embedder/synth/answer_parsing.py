"""Parse LLM answers into queries, ratings, lists and labels; anything else is None (counted upstream)."""
from __future__ import annotations

import json
import re
from typing import Sequence

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str | None):
    """The first JSON object or array in `text` (bare, or inside a ``` fence); None if there is none."""
    if not text:
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for chunk in candidates:
        for start, ch in enumerate(chunk):
            if ch not in "{[":
                continue
            try:
                value, _ = decoder.raw_decode(chunk[start:])
            except ValueError:
                continue
            return value
    return None


def parse_text(text: str | None, field: str) -> str | None:
    """{"<field>": "..."} -> the string with whitespace collapsed; None when missing or empty."""
    obj = extract_json(text)
    if isinstance(obj, dict) and isinstance(obj.get(field), str) and obj[field].strip():
        return " ".join(obj[field].split())
    return None


def parse_rating(text: str | None, low: int, high: int, field: str = "rating") -> float | None:
    """{"rating": n} with low <= n <= high -> n; None otherwise (out of range is garbage, not clipped)."""
    obj = extract_json(text)
    value = obj.get(field) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                return None
        else:
            return None
    return float(value) if low <= value <= high else None


def parse_string_list(text: str | None, field: str) -> list[str] | None:
    """{"<field>": ["a", "b", ...]} (or a bare JSON array) -> the non-empty strings; None if absent."""
    obj = extract_json(text)
    items = obj.get(field) if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        return None
    out = [" ".join(x.split()) for x in items if isinstance(x, str) and x.strip()]
    return out or None


def parse_label(text: str | None, labels: Sequence[str]) -> str | None:
    """{"label": "..."} matched case-insensitively to one of `labels`; None otherwise."""
    obj = extract_json(text)
    value = obj.get("label") if isinstance(obj, dict) else None
    if not isinstance(value, str):
        return None
    wanted = value.strip().lower()
    for label in labels:
        if label.lower() == wanted:
            return label
    return None
