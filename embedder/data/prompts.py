"""Task prompt templates (EmbeddingGemma style) and their prefix form used for truncation."""
from __future__ import annotations

import dataclasses

QUERY_TEMPLATE = "task: {task} | query: {text}"
DOCUMENT_TEMPLATE = "title: {title} | text: {text}"
DEFAULT_TASK = "search result"
# Task names the EmbeddingGemma report uses; any other string works too.
TASK_NAMES = ("search result", "question answering", "fact checking", "classification",
              "clustering", "sentence similarity", "code retrieval")


def _check_template(template, side: str, field: str):
    if template is None:
        return
    if not isinstance(template, str):
        raise TypeError(f"Prompts.{side} must be a str or None, got {type(template).__name__}")
    if not template.endswith("{text}") or template.count("{text}") != 1:
        raise ValueError(f"Prompts.{side} template {template!r} must end with '{{text}}' (once), so "
                         "the prompt is a prefix that truncation can keep whole")
    try:
        template[: -len("{text}")].format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"Prompts.{side} template {template!r} may only use {{{field}}} and "
                         f"{{text}} ({e!r})") from None


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Query and document templates; `None` on a side means the raw text is encoded."""

    query: str | None = QUERY_TEMPLATE
    document: str | None = DOCUMENT_TEMPLATE

    def __post_init__(self):
        _check_template(self.query, "query", "task")
        _check_template(self.document, "document", "title")

    @classmethod
    def none(cls) -> "Prompts":
        """No prompts on either side (e.g. all-MiniLM-L6-v2)."""
        return cls(query=None, document=None)

    @classmethod
    def from_spec(cls, spec: dict | None) -> "Prompts":
        """From a model spec's `prompts` entry (`None` -> no prompts)."""
        if spec is None:
            return cls.none()
        if not isinstance(spec, dict):
            raise TypeError(f"prompts spec must be a dict or None, got {type(spec).__name__}")
        unknown = set(spec) - {"query", "document"}
        if unknown:
            raise ValueError(f"prompts spec has unknown keys {sorted(unknown)}; use 'query' and 'document'")
        return cls(query=spec.get("query"), document=spec.get("document"))

    def to_dict(self) -> dict | None:
        if self.query is None and self.document is None:
            return None
        return {"query": self.query, "document": self.document}

    def query_prefix(self, task: str | None = None) -> str:
        """The query prompt before the text, e.g. `"task: search result | query: "`."""
        if self.query is None:
            return ""
        task = DEFAULT_TASK if task is None else task
        if not isinstance(task, str):
            raise TypeError(f"task must be a str, got {type(task).__name__}")
        return self.query[: -len("{text}")].format(task=task)

    def document_prefix(self, title: str | None = None) -> str:
        """The document prompt before the text; a missing or empty title reads "none"."""
        if self.document is None:
            return ""
        if title is not None and not isinstance(title, str):
            raise TypeError(f"title must be a str or None, got {type(title).__name__}")
        return self.document[: -len("{text}")].format(title=title if title else "none")

    def format_query(self, text: str, task: str | None = None) -> str:
        return self.query_prefix(task) + _text(text)

    def format_document(self, text: str, title: str | None = None) -> str:
        return self.document_prefix(title) + _text(text)


def _text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text
