"""Multi-stage synthetic classification data: entities (from list tails), labelled texts, label check."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterator, Mapping

from embedder.synth import prompts
from embedder.synth.answer_parsing import parse_label, parse_string_list, parse_text
from embedder.synth.runner import LLMRequest, LLMRunner


@dataclasses.dataclass(frozen=True)
class ClassifySpec:
    """What to generate. `labels` maps each label to a short description (may be empty)."""

    name: str
    entity_kind: str  # "films", "online shop customers", ...
    text_kind: str  # "a short review of the film", ...
    labels: Mapping[str, str]
    task: str  # the record's task string, e.g. "Classify the sentiment of a film review"
    question: str = "Which class does this text belong to?"
    lists: int = 3
    entities_per_list: int = 40
    tail: int = 15
    texts_per_label: int = 1
    entity_params: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: {"temperature": 1.0, "max_tokens": 2048})
    text_params: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: {"temperature": 0.9, "max_tokens": 256})
    check_params: Mapping[str, object] = dataclasses.field(
        default_factory=lambda: {"temperature": 0.0, "max_tokens": 16})

    def __post_init__(self):
        if len(self.labels) < 2:
            raise ValueError(f"classify spec {self.name!r}: needs at least two labels, got {list(self.labels)}")
        if not 0 < self.tail <= self.entities_per_list:
            raise ValueError(f"classify spec {self.name!r}: need 0 < tail ({self.tail}) <= entities_per_list "
                             f"({self.entities_per_list})")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ClassifySpec":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{os.fspath(path)}: unknown classify spec fields {unknown}; known: {sorted(known)}")
        labels = data.get("labels")
        if isinstance(labels, list):
            data["labels"] = {str(label): "" for label in labels}
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from None


def generate_entities(spec: ClassifySpec, runner: LLMRunner, counts: collections.Counter) -> list[str]:
    """Unique entities from the tails of `spec.lists` long generated lists.

    The head of a generated list repeats the most typical items from run to run;
    the tail is where the model reaches for rarer ones, hence the diversity.
    """
    requests = []
    for i in range(spec.lists):
        prompt_id, messages = prompts.entity_list(spec.entity_kind, spec.entities_per_list, i)
        requests.append(LLMRequest(messages, {**spec.entity_params, "seed": i}, tag=prompt_id))
    entities, seen = [], set()
    for result in runner.run(requests):
        items = parse_string_list(result.answer, "items") if result.answer is not None else None
        if items is None:
            counts["failed" if result.answer is None else "unparseable"] += 1
            continue
        for item in items[-spec.tail:]:
            if item.lower() not in seen:
                seen.add(item.lower())
                entities.append(item)
    counts["entities"] += len(entities)
    return entities


def generate_classification(
    spec: ClassifySpec, runner: LLMRunner, counts: collections.Counter | None = None
) -> Iterator[dict]:
    """Records {"query": text, "positive": label, "task": spec.task, "synth": ...} that pass the label check."""
    counts = counts if counts is not None else collections.Counter()
    entities = generate_entities(spec, runner, counts)
    labels = list(spec.labels)

    def text_requests():
        for entity in entities:
            for label in labels:
                prompt_id, messages = prompts.labelled_text(spec.text_kind, entity, label, spec.labels[label] or None)
                for sample in range(spec.texts_per_label):
                    yield LLMRequest(messages, {**spec.text_params, "seed": sample}, tag=(entity, label, prompt_id))

    def check_requests():
        for result in runner.run(text_requests()):
            if result.answer is None:
                counts["failed"] += 1
                continue
            text = parse_text(result.answer, "text")
            if text is None:
                counts["unparseable"] += 1
                continue
            entity, label, text_prompt_id = result.request.tag
            check_id, messages = prompts.label_check(text, labels, spec.question)
            yield LLMRequest(messages, spec.check_params, tag=(entity, label, text, text_prompt_id, check_id))

    for result in runner.run(check_requests()):
        entity, label, text, text_prompt_id, check_id = result.request.tag
        if result.answer is None:
            counts["failed"] += 1
            continue
        checked = parse_label(result.answer, labels)
        if checked is None:
            counts["unparseable"] += 1
            continue
        if checked != label:
            counts["dropped_label_mismatch"] += 1
            continue
        counts["written"] += 1
        yield {
            "query": text,
            "positive": label,
            "task": spec.task,
            "synth": {"llm": runner.client.name, "prompt_id": text_prompt_id, "check_prompt_id": check_id,
                      "entity": entity, "label": label, "checked_label": checked},
        }
