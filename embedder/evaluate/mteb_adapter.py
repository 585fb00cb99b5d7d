"""Run `mteb` (2.x) benchmarks with our models: an `EncoderProtocol` adapter and local tasks.

    import mteb
    from embedder.evaluate.mteb_adapter import MTEBEncoder
    model = MTEBEncoder("workdir/run1", dim=256)           # or MTEBEncoder(encoder=embedder)
    mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["STSBenchmark"]))

MTEB's task metadata picks our task prompt (`TASK_TYPE_PROMPTS`; code tasks get "code
retrieval") and its prompt type picks the role (query / document; documents keep their
title separate). `local_task(DIR)` wraps one of our task directories as an MTEB task, so
MTEB's own evaluators run on local files with no download.
"""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from embedder.evaluate.tasks import load_task
from embedder.inference import Embedder

# EmbeddingGemma's task names, keyed by MTEB task type.
TASK_TYPE_PROMPTS = {
    "Retrieval": "search result",
    "InstructionRetrieval": "search result",
    "Reranking": "search result",
    "InstructionReranking": "search result",
    "Classification": "classification",
    "MultilabelClassification": "classification",
    "Clustering": "clustering",
    "STS": "sentence similarity",
    "PairClassification": "sentence similarity",
    "Summarization": "sentence similarity",
    "BitextMining": "sentence similarity",
}


def task_prompt(task_metadata: TaskMetadata, overrides: dict[str, str] | None = None) -> str:
    """Our task string for an MTEB task: an override by task name or type, else by type."""
    overrides = overrides or {}
    for key in (task_metadata.name, task_metadata.type):
        if key in overrides:
            return overrides[key]
    if task_metadata.type in ("Retrieval", "Reranking") and "Programming" in (task_metadata.domains or []):
        return "code retrieval"
    return TASK_TYPE_PROMPTS.get(task_metadata.type, "search result")


class MTEBEncoder(AbsEncoder):
    """Our encoder (anything with `Embedder.encode`'s signature) behind MTEB's protocol."""

    def __init__(self, model_name: str | None = None, revision: str | None = None, *, encoder=None,
                 device: str | None = None, dim: int | None = None, task_prompts: dict[str, str] | None = None,
                 batch_size: int = 64, **kwargs: Any) -> None:
        if encoder is None:
            if model_name is None:
                raise ValueError("MTEBEncoder needs a model path (model_name) or an encoder object (encoder=...)")
            encoder = Embedder.load(model_name)
        self.model = encoder
        self.dim = dim
        self.task_prompts = dict(task_prompts or {})
        self.batch_size = batch_size
        name = pathlib.Path(model_name).name if model_name else type(encoder).__name__
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": f"embedder/{name}", "revision": revision or "local", "framework": ["JAX"],
            "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": True, "embed_dim": dim,
            "open_weights": True,
        })

    def encode(self, inputs, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        role = "document" if prompt_type == PromptType.document else "query"
        task = task_prompt(task_metadata, self.task_prompts)
        parts = []
        for batch in inputs:
            if role == "document" and "body" in batch and "title" in batch:
                # MTEB joins title and text into "text"; our document prompt takes them apart.
                texts = list(batch["body"])
                titles = [t or None for t in batch["title"]]
            else:
                texts, titles = list(batch["text"]), None
            parts.append(np.asarray(self.model.encode(texts, role=role, task=task, dim=self.dim,
                                                      batch_size=self.batch_size, titles=titles), np.float32))
        if not parts:
            return np.zeros((0, self.dim or 0), np.float32)
        return np.concatenate(parts, axis=0)


_LOCAL_TYPES = {"retrieval": "Retrieval", "classification": "Classification", "clustering": "Clustering",
                "sts": "STS", "pair_classification": "PairClassification", "bitext_mining": "BitextMining"}
_MAIN_SCORES = {"Retrieval": "ndcg_at_10", "Classification": "accuracy", "Clustering": "v_measure",
                "STS": "cosine_spearman", "PairClassification": "max_ap", "BitextMining": "f1"}


def local_task(task_dir, eval_lang: str = "eng-Latn"):
    """One of our task directories as an MTEB task object (data read from disk, no download)."""
    ours = load_task(task_dir)
    if ours.type not in _LOCAL_TYPES:
        raise ValueError(f"local_task: {ours.type!r} tasks are not wrapped for MTEB; supported: {sorted(_LOCAL_TYPES)}")
    mteb_type = _LOCAL_TYPES[ours.type]
    metadata = TaskMetadata(
        name=ours.name, description=f"Local task read from {ours.path}.", reference=None,
        dataset={"path": str(ours.path), "revision": "local"}, type=mteb_type, category="t2t",
        modalities=["text"], eval_splits=["test"], eval_langs=[eval_lang], main_score=_MAIN_SCORES[mteb_type],
        date=None, domains=None, task_subtypes=None, license=None, annotations_creators=None, dialect=None,
        sample_creation=None, bibtex_citation=None)
    d = ours.data

    def load_data(self, num_proc=None, **kwargs):
        if ours.type == "retrieval":
            split = {
                "corpus": Dataset.from_dict({"id": d["corpus_ids"], "text": d["corpus_texts"],
                                             "title": [t or "" for t in d["corpus_titles"]]}),
                "queries": Dataset.from_dict({"id": d["query_ids"], "text": d["query_texts"]}),
                "relevant_docs": {q: dict(d["qrels"][q]) for q in d["query_ids"]},
                "top_ranked": None,
            }
            self.dataset = {"default": {"test": split}}
        elif ours.type == "classification":
            self.dataset = DatasetDict({s: Dataset.from_dict({"text": d[s]["texts"], "label": d[s]["labels"]})
                                        for s in ("train", "test")})
        elif ours.type == "clustering":
            self.dataset = DatasetDict({"test": Dataset.from_dict({"sentences": d["texts"], "labels": d["labels"]})})
        elif ours.type == "sts":
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": d["sentence1"], "sentence2": d["sentence2"], "score": d["scores"]})})
        elif ours.type == "bitext_mining":
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": d["sentence1"], "sentence2": d["sentence2"]})})
        else:
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"sentence1": d["sentence1"], "sentence2": d["sentence2"], "labels": [int(x) for x in d["labels"]]})})
        self.data_loaded = True

    base = {"Retrieval": AbsTaskRetrieval, "Classification": AbsTaskClassification, "Clustering": AbsTaskClustering,
            "STS": AbsTaskSTS, "PairClassification": AbsTaskPairClassification,
            "BitextMining": AbsTaskBitextMining}[mteb_type]
    attrs: dict[str, Any] = {"metadata": metadata, "load_data": load_data}
    if mteb_type == "STS":
        attrs.update(min_score=min(d["scores"]), max_score=max(d["scores"]))
    cls = type(f"Local{mteb_type}Task", (base,), attrs)
    return cls()
