"""Prompt templates (each with a stable prompt_id recorded in outputs) for the synth pipelines."""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

MAX_PASSAGE_CHARS = 4000  # bounds prompt size; embedding models see far less anyway

SYSTEM = "You write and judge data for training text embedding models. Answer with one JSON object only."


@dataclasses.dataclass(frozen=True)
class QueryTask:
    """A task type for query generation: the embedding task string and how to write its queries."""

    task: str  # goes into the record's `task` field (the task prompt at training time)
    instruction: str
    examples: tuple[tuple[str, str], ...]  # (passage, query) few-shot pairs


QUERY_TASKS: dict[str, QueryTask] = {
    "retrieval": QueryTask(
        task="search result",
        instruction=(
            "Write one search-engine query that a user could type and for which the passage is a good result. "
            "Use different words from the passage where natural; do not copy sentences."
        ),
        examples=(
            ("GNU Wget is a free utility for non-interactive download of files from the Web. It supports HTTP, "
             "HTTPS, and FTP protocols, as well as retrieval through HTTP proxies.",
             "command line tool to download files over http and ftp"),
            ("The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 as the entrance arch "
             "to the World's Fair.",
             "when was the eiffel tower built"),
        ),
    ),
    "question_answering": QueryTask(
        task="question answering",
        instruction="Write one natural question that the passage answers. It must be answerable from the passage alone.",
        examples=(
            ("Rsync is a fast and versatile file-copying tool. It uses a delta-transfer algorithm which reduces "
             "the amount of data sent over the network by sending only the differences.",
             "How does rsync reduce the amount of data it sends over the network?"),
            ("Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a "
             "by-product.",
             "What gas is released as a by-product of photosynthesis?"),
        ),
    ),
    "fact_checking": QueryTask(
        task="fact checking",
        instruction=(
            "Write one short factual claim that the passage supports or refutes, phrased as a statement "
            "someone might want to verify."
        ),
        examples=(
            ("SQLite is a C library that implements an SQL database engine. Programs linked with it can have "
             "SQL database access without running a separate RDBMS process.",
             "SQLite requires a separate database server process to run."),
            ("Mount Everest, at 8,849 metres, is Earth's highest mountain above sea level.",
             "Mount Everest is more than 8,000 metres high."),
        ),
    ),
}


def _passage_block(text: str, title: str | None) -> str:
    text = text[:MAX_PASSAGE_CHARS]
    return f"Title: {title}\nPassage: {text}" if title else f"Passage: {text}"


def query_generation(task_type: str, passage: str, title: str | None) -> tuple[str, list[dict]]:
    """(prompt_id, messages) asking for {"query": ...}; the few-shot examples are prior chat turns."""
    if task_type not in QUERY_TASKS:
        raise ValueError(f"unknown task type {task_type!r}; choose from {', '.join(QUERY_TASKS)}")
    spec = QUERY_TASKS[task_type]
    messages = [{"role": "system", "content": SYSTEM}]
    for ex_passage, ex_query in spec.examples:
        messages.append({"role": "user", "content": f"{spec.instruction}\n\n{_passage_block(ex_passage, None)}"})
        messages.append({"role": "assistant", "content": json.dumps({"query": ex_query})})
    messages.append({"role": "user", "content": f"{spec.instruction}\n\n{_passage_block(passage, title)}"})
    return f"queries/{task_type}/v1", messages


RELEVANCE_SCALE = (0, 3)
_RELEVANCE_INSTRUCTION = (
    "Rate how well the passage serves the query on this scale:\n"
    "0 = irrelevant; 1 = on the topic but does not answer it; 2 = partly answers it; "
    "3 = fully and directly answers it.\n"
    'Answer as {"rating": N}.'
)
_RELEVANCE_EXAMPLES = (
    ("how to resize a partition on linux",
     "GParted is a graphical partition editor: it can create, delete, resize, move and copy partitions.", 3),
    ("how to resize a partition on linux",
     "The ext4 filesystem supports volumes up to 1 exbibyte and files up to 16 tebibytes.", 1),
    ("best pizza in naples", "The rsync protocol transfers only the differences between files.", 0),
)


def relevance_rating(query: str, passage: str) -> tuple[str, list[dict]]:
    """(prompt_id, messages) for a graded 0-3 relevance judgement of one (query, passage) pair."""
    messages = [{"role": "system", "content": SYSTEM}]
    for ex_q, ex_p, ex_r in _RELEVANCE_EXAMPLES:
        messages.append({"role": "user", "content": f"{_RELEVANCE_INSTRUCTION}\n\nQuery: {ex_q}\n{_passage_block(ex_p, None)}"})
        messages.append({"role": "assistant", "content": json.dumps({"rating": ex_r})})
    messages.append({"role": "user", "content": f"{_RELEVANCE_INSTRUCTION}\n\nQuery: {query}\n{_passage_block(passage, None)}"})
    return "rate/relevance/v1", messages


QUERY_LIKELIHOOD_SCALE = (0, 100)


def query_likelihood(query: str, passage: str) -> tuple[str, list[dict]]:
    """(prompt_id, messages) asking for the chance (0-100) that a reader of the passage would ask the query.

    A verbalised stand-in for the token log-likelihood of the query given the
    passage, which chat endpoints do not expose uniformly.
    """
    content = (
        "Imagine a user who wants exactly the information in the passage below. How likely (0-100) is it "
        "that this user would write the given query to find it? Judge only the passage-to-query fit.\n"
        'Answer as {"likelihood": N}.\n\n'
        f"{_passage_block(passage, None)}\nQuery: {query}"
    )
    return "rate/query_likelihood/v1", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def entity_list(kind: str, count: int, round_index: int) -> tuple[str, list[dict]]:
    """(prompt_id, messages) asking for a long list of diverse entities (we keep only its tail)."""
    content = (
        f"List {count} different, specific {kind}. Make them diverse: mix popular and obscure, old and new, "
        f"and different regions and styles. This is list number {round_index + 1}.\n"
        'Answer as {"items": ["...", "..."]}.'
    )
    return "classify/entities/v1", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def labelled_text(text_kind: str, entity: str, label: str, label_description: str | None) -> tuple[str, list[dict]]:
    """(prompt_id, messages) asking for one text about `entity` whose correct label is `label`."""
    described = f"{label} ({label_description})" if label_description else label
    content = (
        f"Write {text_kind} about: {entity}.\nIt must clearly belong to the class: {described}.\n"
        "Do not name the class itself; write naturally, 2 to 5 sentences.\n"
        'Answer as {"text": "..."}.'
    )
    return "classify/text/v1", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def label_check(text: str, labels: Sequence[str], question: str) -> tuple[str, list[dict]]:
    """(prompt_id, messages) asking the LLM to classify `text` into one of `labels`."""
    content = (
        f"{question}\nChoose exactly one of: {', '.join(labels)}.\n"
        f"Text: {text[:MAX_PASSAGE_CHARS]}\n"
        'Answer as {"label": "..."}.'
    )
    return "classify/check/v1", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
