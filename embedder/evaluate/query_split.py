"""A fixed split of a retrieval task's queries into a selection half and a report half.

Model selection (`python -m embedder.soup --task DIR`) scores only the selection half;
`python -m embedder.evaluate --queries report` scores only the report half, so reported
numbers never chose the model. A query's half is a seeded SHA-256 of its id: the same on
every machine and Python version, and independent of the order of `queries.jsonl`.
"""
from __future__ import annotations

import dataclasses
import hashlib

from embedder.evaluate.tasks import Task

HALVES = ("select", "report")


class QuerySplitError(ValueError):
    """A task that cannot be split into selection and report queries (the message says why)."""


def query_half(query_id: str, seed: int = 0) -> str:
    """`"select"` or `"report"`: the lowest bit of sha256(f"{seed}:{query_id}")."""
    digest = hashlib.sha256(f"{int(seed)}:{query_id}".encode("utf-8")).digest()
    return HALVES[digest[-1] & 1]


def split_task(task: Task, half: str, seed: int = 0) -> Task:
    """The retrieval task with only the queries of `half` (corpus and judgements unchanged)."""
    if half not in HALVES:
        raise QuerySplitError(f"query half {half!r} is unknown; use one of {', '.join(HALVES)}")
    if task.type != "retrieval":
        raise QuerySplitError(f"task {task.name} ({task.path}) is a {task.type} task: only retrieval queries "
                              "split into selection and report halves; select on a task you do not report "
                              "instead (python -m embedder.soup --select-task DIR)")
    d = task.data
    keep = [i for i, qid in enumerate(d["query_ids"]) if query_half(qid, seed) == half]
    if not keep:
        raise QuerySplitError(f"task {task.name} ({task.path}): none of its {len(d['query_ids'])} queries falls "
                              f"in the {half} half with split seed {seed}; use a larger task or another seed")
    data = dict(d, query_ids=[d["query_ids"][i] for i in keep], query_texts=[d["query_texts"][i] for i in keep])
    return dataclasses.replace(task, data=data)


def describe_split(full: Task, part: Task, half: str, seed: int) -> dict:
    """What soup.json and evaluation results record about a split task."""
    return {"task": full.name, "path": str(full.path), "half": half, "split_seed": int(seed),
            "queries": len(part.data["query_ids"]), "of": len(full.data["query_ids"])}
