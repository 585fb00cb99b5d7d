"""Run evaluation tasks with any encoder: encode once at full dim, score at every MRL dim.

`encoder` is anything with `encode(texts, role="query"|"document", task=None, dim=None,
batch_size=64, titles=None) -> np.ndarray` of L2-normalised float32 rows (`Embedder`, or a
wrapper around an in-training model). Results:

    {task_name: {"type": ..., "prompt": ..., "size": {...}, "dims": {"768": {metric: value}}}}

`flatten_results` turns them into the training loop's `metrics.jsonl` keys
`eval/<task_name>/<metric>@<dim>` (see `embedder.evaluate.plots`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from embedder.evaluate.bitext import evaluate_bitext_mining
from embedder.evaluate.classification import evaluate_classification, evaluate_clustering
from embedder.evaluate.pair_scoring import evaluate_pair_classification, evaluate_reranking, evaluate_sts
from embedder.evaluate.retrieval_metrics import mean_metrics
from embedder.evaluate.search import exact_top_k
from embedder.evaluate.tasks import Task, load_task
from embedder.mrl import truncate_normalize


def encode_texts(encoder, texts: Sequence[str], *, role: str, task: str | None, titles=None,
                 batch_size: int = 64, progress: bool = False, desc: str = "") -> np.ndarray:
    """Encode at full dim in chunks (so a tqdm bar can advance); returns `[N, D]` float32."""
    texts = list(texts)
    if not texts:
        raise ValueError(f"nothing to encode for {desc or role}")
    chunk = max(1, batch_size) * 4
    bar = None
    if progress:
        bar = tqdm(total=len(texts), desc=desc or role, unit="text", leave=False)
    parts = []
    for start in range(0, len(texts), chunk):
        piece_titles = None if titles is None else list(titles[start:start + chunk])
        parts.append(np.asarray(encoder.encode(texts[start:start + chunk], role=role, task=task, dim=None,
                                               batch_size=batch_size, titles=piece_titles), dtype=np.float32))
        if bar is not None:
            bar.update(len(parts[-1]))
    if bar is not None:
        bar.close()
    out = np.concatenate(parts, axis=0)
    if out.shape[0] != len(texts):
        raise ValueError(f"encoder returned {out.shape[0]} rows for {len(texts)} texts ({desc or role})")
    return out


def _dims_or_full(dims: Sequence[int] | None, full: int) -> list[int]:
    return [full] if not dims else [int(d) for d in dims]


def _run_retrieval(task, dims, enc, top_k):
    d = task.data
    titles = d["corpus_titles"] if any(d["corpus_titles"]) else None
    q = enc(d["query_texts"], role="query", task=task.prompt, desc=f"{task.name} queries")
    c = enc(d["corpus_texts"], role="document", task=task.prompt, titles=titles, desc=f"{task.name} corpus")
    out = {}
    for dim in _dims_or_full(dims, q.shape[1]):
        _, idx = exact_top_k(truncate_normalize(q, dim), truncate_normalize(c, dim), top_k)
        rankings = {qid: [d["corpus_ids"][j] for j in row] for qid, row in zip(d["query_ids"], idx)}
        qrels = {qid: d["qrels"][qid] for qid in d["query_ids"]}
        out[dim] = mean_metrics(rankings, qrels)
    return out, {"queries": len(d["query_ids"]), "corpus": len(d["corpus_ids"])}


def _run_classification(task, dims, enc, shots, seeds):
    d = task.data
    tr = enc(d["train"]["texts"], role="query", task=task.prompt, desc=f"{task.name} train")
    te = enc(d["test"]["texts"], role="query", task=task.prompt, desc=f"{task.name} test")
    out = {dim: evaluate_classification(truncate_normalize(tr, dim), d["train"]["labels"], truncate_normalize(te, dim),
                                        d["test"]["labels"], shots=shots, seeds=seeds)
           for dim in _dims_or_full(dims, tr.shape[1])}
    return out, {"train": len(tr), "test": len(te)}


def _run_clustering(task, dims, enc, seeds):
    e = enc(task.data["texts"], role="query", task=task.prompt, desc=task.name)
    out = {dim: evaluate_clustering(truncate_normalize(e, dim), task.data["labels"], seeds=seeds)
           for dim in _dims_or_full(dims, e.shape[1])}
    return out, {"test": len(e)}


def _run_pairs(task, dims, enc):
    d = task.data
    a = enc(d["sentence1"], role="query", task=task.prompt, desc=f"{task.name} sentence1")
    b = enc(d["sentence2"], role="query", task=task.prompt, desc=f"{task.name} sentence2")
    score = evaluate_sts if task.type == "sts" else evaluate_pair_classification
    target = d["scores"] if task.type == "sts" else d["labels"]
    out = {dim: score(truncate_normalize(a, dim), truncate_normalize(b, dim), target)
           for dim in _dims_or_full(dims, a.shape[1])}
    return out, {"pairs": len(a)}


def _run_bitext(task, dims, enc):
    d = task.data
    a = enc(d["sentence1"], role="query", task=task.prompt, desc=f"{task.name} sentence1")
    b = enc(d["sentence2"], role="query", task=task.prompt, desc=f"{task.name} sentence2")
    out = {dim: evaluate_bitext_mining(truncate_normalize(a, dim), truncate_normalize(b, dim))
           for dim in _dims_or_full(dims, a.shape[1])}
    return out, {"pairs": len(a)}


def _run_reranking(task, dims, enc):
    d = task.data
    q = enc(d["queries"], role="query", task=task.prompt, desc=f"{task.name} queries")
    flat, owner, relevant = [], [], []
    for i, (pos, neg) in enumerate(zip(d["positives"], d["negatives"])):
        flat += list(pos) + list(neg)
        owner += [i] * (len(pos) + len(neg))
        relevant += [True] * len(pos) + [False] * len(neg)
    c = enc(flat, role="document", task=task.prompt, desc=f"{task.name} candidates")
    owner, relevant = np.asarray(owner), np.asarray(relevant)
    out = {}
    for dim in _dims_or_full(dims, q.shape[1]):
        qd, cd = truncate_normalize(q, dim), truncate_normalize(c, dim)
        out[dim] = evaluate_reranking(qd, [cd[owner == i] for i in range(len(qd))],
                                      [relevant[owner == i] for i in range(len(qd))])
    return out, {"queries": len(q), "candidates": len(c)}


def subsample_task(task: Task, max_items: int, seed: int = 0) -> Task:
    """The task with at most `max_items` queries / test texts / pairs (each train split too),
    drawn once with `seed`; the retrieval corpus and every judged document stay. For cheap,
    repeatable evaluations during training: numbers are not comparable with full runs."""
    rng = np.random.RandomState(seed)

    def pick(n):
        return np.sort(rng.choice(n, max_items, replace=False)) if n > max_items else np.arange(n)

    def take(columns: dict) -> dict:
        n = len(next(iter(columns.values())))
        idx = pick(n)
        return {k: [v[i] for i in idx] for k, v in columns.items()}

    d = task.data
    if task.type == "retrieval":
        kept = take({"query_ids": d["query_ids"], "query_texts": d["query_texts"]})
        data = dict(d, **kept)
    elif task.type == "classification":
        data = {"train": take(d["train"]), "test": take(d["test"])}
    else:
        data = take(d)
    return dataclasses.replace(task, data=data)


def evaluate_task(encoder, task: Task | str | pathlib.Path, dims: Sequence[int] | None = None, *,
                  batch_size: int = 64, top_k: int = 1000, shots: Sequence[int] = (16,), seeds: int = 5,
                  max_queries: int | None = None, progress: bool = False) -> dict:
    """Evaluate one task (a `Task` or a task directory) at each dim in `dims` (None: full dim).

    `max_queries` > 0 evaluates on a fixed seeded subsample (see `subsample_task`)."""
    if not isinstance(task, Task):
        task = load_task(task)
    if max_queries:
        task = subsample_task(task, int(max_queries))

    def enc(texts, *, role, task, titles=None, desc=""):
        return encode_texts(encoder, texts, role=role, task=task, titles=titles, batch_size=batch_size,
                            progress=progress, desc=desc)

    if task.type == "retrieval":
        scores, size = _run_retrieval(task, dims, enc, top_k)
    elif task.type == "classification":
        scores, size = _run_classification(task, dims, enc, shots, seeds)
    elif task.type == "clustering":
        scores, size = _run_clustering(task, dims, enc, seeds)
    elif task.type in ("sts", "pair_classification"):
        scores, size = _run_pairs(task, dims, enc)
    elif task.type == "bitext_mining":
        scores, size = _run_bitext(task, dims, enc)
    else:
        scores, size = _run_reranking(task, dims, enc)
    return {"type": task.type, "prompt": task.prompt, "size": size,
            "dims": {str(dim): metrics for dim, metrics in scores.items()}}


def evaluate_tasks(encoder, tasks: Iterable[Task | str | pathlib.Path], dims: Sequence[int] | None = None,
                   **kwargs) -> dict[str, dict]:
    """Evaluate every task; `{task_name: evaluate_task(...)}`. Pass loaded `Task`s to
    avoid re-reading files when called periodically from a training loop."""
    results: dict[str, dict] = {}
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    names = [t.name for t in loaded]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names {duplicates} appear more than once; give each task.json a distinct 'name'")
    for task in loaded:
        results[task.name] = evaluate_task(encoder, task, dims, **kwargs)
    return results


def flatten_results(results: dict[str, dict], prefix: str = "eval") -> dict[str, float]:
    """`{task: {"dims": {dim: {metric: v}}}}` -> `{"<prefix>/<task>/<metric>@<dim>": v}`."""
    flat = {}
    for name, result in results.items():
        for dim, metrics in result["dims"].items():
            for metric, value in metrics.items():
                flat[f"{prefix}/{name}/{metric}@{dim}"] = float(value)
    return flat
