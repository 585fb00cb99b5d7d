"""Few-shot query generation for passages, per task type (retrieval, question answering, fact checking)."""
from __future__ import annotations

import collections
from typing import Iterable, Iterator, Mapping, Sequence

from embedder.synth import prompts
from embedder.synth.answer_parsing import parse_text
from embedder.synth.runner import LLMRequest, LLMRunner

DEFAULT_PARAMS = {"temperature": 0.7, "max_tokens": 128}


def generate_queries(
    passages: Iterable[Mapping],
    runner: LLMRunner,
    *,
    task_types: Sequence[str] = ("retrieval",),
    queries_per_passage: int = 1,
    params: Mapping[str, object] = DEFAULT_PARAMS,
    counts: collections.Counter | None = None,
) -> Iterator[dict]:
    """One record per (passage, task type, sample) whose answer parses.

    `passages` yield {"text", "title"?}. Extra samples of the same prompt differ
    by `sample` in the request parameters, so each has its own cache entry.
    """
    for t in task_types:
        if t not in prompts.QUERY_TASKS:
            raise ValueError(f"--task-types: unknown {t!r}; choose from {', '.join(prompts.QUERY_TASKS)}")
    counts = counts if counts is not None else collections.Counter()

    def requests():
        for passage in passages:
            for task_type in task_types:
                prompt_id, messages = prompts.query_generation(task_type, passage["text"], passage.get("title"))
                for sample in range(queries_per_passage):
                    p = dict(params)
                    if queries_per_passage > 1:
                        p["seed"] = int(p.get("seed", 0)) + sample
                    yield LLMRequest(messages, p, tag=(passage, task_type, prompt_id, sample))

    for result in runner.run(requests()):
        passage, task_type, prompt_id, sample = result.request.tag
        if result.answer is None:
            counts["failed"] += 1
            continue
        query = parse_text(result.answer, "query")
        if query is None:
            counts["unparseable"] += 1
            continue
        counts["written"] += 1
        record = {"query": query, "positive": passage["text"], "task": prompts.QUERY_TASKS[task_type].task}
        if passage.get("title"):
            record["title"] = passage["title"]
        record["synth"] = {"llm": runner.client.name, "prompt_id": prompt_id, "task_type": task_type,
                           "sample": sample}
        yield record
