"""Evaluation of embedding models: task loading, metrics, evaluators, MTEB adapter, plots.

`evaluate_tasks(encoder, task_dirs, dims)` works with any object that has
`Embedder.encode`'s signature, including a wrapper around an in-training model.
"""
from embedder.evaluate.retrieval_metrics import mean_metrics, query_metrics
from embedder.evaluate.runner import encode_texts, evaluate_task, evaluate_tasks, flatten_results
from embedder.evaluate.search import exact_top_k
from embedder.evaluate.tasks import TASK_TYPES, Task, TaskFormatError, infer_task_type, load_task
from embedder.mrl import truncate_normalize

__all__ = [
    "TASK_TYPES", "Task", "TaskFormatError", "encode_texts", "evaluate_task", "evaluate_tasks", "exact_top_k",
    "flatten_results", "infer_task_type", "load_task", "mean_metrics", "query_metrics", "truncate_normalize",
]
