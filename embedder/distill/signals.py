"""Teacher signals: a teacher embedder's embeddings (and/or scores) of a dataset's texts, stored
once (`python -m embedder.distill teacher`) and joined to training rows by key.

A signals directory holds `signals.json` (written last: the directory is complete when it exists)
and `.npy` arrays:

    query_keys.npy    [Nq] uint64 sorted    query.npy    [Nq, Dt]   the teacher's unit query embeddings
    document_keys.npy [Nd] uint64 sorted    document.npy [Nd, Dt]   ... of positives and negatives
    score_keys.npy    [Np] uint64 sorted    scores.npy   [Np] f32   its cosine of (query, document) pairs

Keys are text identities in context (`text_identity.keyed_text_ids`): a query is keyed by its task
and text, a document by its title and text (negatives have no title), so a row finds its teacher
signals whatever order, packing or host brought it there, and a text seen under another prompt
is not mistaken for it. The teacher's tokenizer and width are its own: only embeddings and scores
are stored.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np

from embedder.data.text_identity import keyed_text_ids

SIGNALS_FILE = "signals.json"
VERSION = 1
STORES = ("embeddings", "scores", "both")
# The batch entries the join adds (ARCHITECTURE.md "Batches").
TEACHER_ENTRIES = ("teacher_query", "teacher_positive", "teacher_negative", "teacher_scores")


class SignalsError(ValueError):
    """Teacher signals that cannot be written, read or joined; the message names the fix."""


def query_contexts(tasks: Sequence[str]) -> list[str]:
    return [f"query\x1f{t}" for t in tasks]


def document_contexts(titles: Sequence[str | None]) -> list[str]:
    return [f"document\x1f{t or ''}" for t in titles]


def as_uint64(ids: np.ndarray) -> np.ndarray:
    """`[..., 2] uint32` (high, low) ids as `[...] uint64`."""
    ids = np.asarray(ids, np.uint64)
    return (ids[..., 0] << np.uint64(32)) | ids[..., 1]


def query_keys(tasks, texts) -> np.ndarray:
    return as_uint64(keyed_text_ids(query_contexts(tasks), texts))


def document_keys(titles, texts) -> np.ndarray:
    return as_uint64(keyed_text_ids(document_contexts(titles), texts))


def pair_keys(query: np.ndarray, document: np.ndarray) -> np.ndarray:
    """A 64-bit key of each (query key, document key) pair (odd multipliers, wrapping)."""
    with np.errstate(over="ignore"):
        return (np.asarray(query, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                ^ np.asarray(document, np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of each of `keys` in `sorted_keys`."""
    idx = np.searchsorted(sorted_keys, keys)
    idx = np.minimum(idx, max(len(sorted_keys) - 1, 0))
    found = (sorted_keys[idx] == keys) if len(sorted_keys) else np.zeros(keys.shape, bool)
    return idx, found


def read_manifest(directory) -> dict:
    directory = pathlib.Path(directory)
    path = directory / SIGNALS_FILE
    if not path.is_file():
        partial = " (a teacher pass was started there but not finished: rerun its command to resume)" \
            if (directory / "partial").is_dir() else ""
        raise SignalsError(f"{directory} holds no teacher signals ({SIGNALS_FILE} missing){partial}; write them "
                           "with `python -m embedder.distill teacher --teacher MODEL --data FILE.jsonl --out DIR`")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != VERSION:
        raise SignalsError(f"{path} is version {manifest.get('version')!r}, this code reads version {VERSION}; "
                           "rerun the teacher pass into a new directory")
    return manifest


def teacher_projection_dim(config) -> int:
    """The teacher width a train config's student must be mapped to for embedding distillation,
    or 0 when no map is needed (no embedding matching, or equal widths)."""
    teacher = str(config.data.get("teacher", "") or "")
    if not teacher or not float(config.loss.get("distill_embedding_weight", 0.0)):
        return 0
    from embedder.model.config import ModelConfig

    width = int(read_manifest(teacher)["width"])
    return 0 if width == ModelConfig.from_dict(config.model.to_dict()).embedding_dim else width


class TeacherSignals:
    """A complete signals directory, memory-mapped; `join` gives a batch's teacher entries."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.manifest = read_manifest(self.directory)
        self.width = int(self.manifest["width"])
        store = self.manifest["store"]
        self.has_embeddings = store in ("embeddings", "both")
        self.has_scores = store in ("scores", "both")

        def load(name):
            return np.load(self.directory / f"{name}.npy", mmap_mode="r")
        if self.has_embeddings:
            self._query_keys, self._query = np.asarray(load("query_keys")), load("query")
            self._document_keys, self._document = np.asarray(load("document_keys")), load("document")
        if self.has_scores:
            self._score_keys, self._scores = np.asarray(load("score_keys")), np.asarray(load("scores"))

    def _missing(self, what: str, texts: Sequence[str], found: np.ndarray):
        missing = [t for t, ok in zip(texts, found.reshape(-1)) if not ok]
        first = missing[0][:60]
        raise SignalsError(
            f"teacher signals {self.directory} lack {len(missing)} of the batch's {what} texts (first: {first!r}); "
            f"they were written for {self.manifest['data']} with task {self.manifest['task']!r}: run the teacher "
            "pass on this run's data (the same --task as the dataset's task), or point data.teacher at its signals")

    def join(self, queries: Sequence[str], tasks: Sequence[str], positives: Sequence[str],
             titles: Sequence[str | None], negatives: Sequence[Sequence[str]], k: int) -> dict[str, np.ndarray]:
        """The teacher entries of `n` rows (ARCHITECTURE.md "Batches"): `teacher_query`,
        `teacher_positive` `[n, Dt]`, `teacher_negative` `[n, k, Dt]` (zeros in empty slots),
        and/or `teacher_scores` `[n, 1 + k]` (positive, then negatives; 0 in empty slots);
        float32. A text the signals lack is a `SignalsError` naming it."""
        n = len(queries)
        qk = query_keys(tasks, queries)
        pk = document_keys(titles, positives)
        flat_negs = [t for row in negatives for t in row]
        nk = document_keys([None] * len(flat_negs), flat_negs)
        slots = [(i, j) for i, row in enumerate(negatives) for j in range(len(row))]
        out = {}
        if self.has_embeddings:
            qi, ok = _find(self._query_keys, qk)
            if not ok.all():
                self._missing("query", queries, ok)
            pi, ok = _find(self._document_keys, pk)
            if not ok.all():
                self._missing("positive", positives, ok)
            out["teacher_query"] = np.asarray(self._query[qi], np.float32)
            out["teacher_positive"] = np.asarray(self._document[pi], np.float32)
            if k:
                neg = np.zeros((n, k, self.width), np.float32)
                if flat_negs:
                    ni, ok = _find(self._document_keys, nk)
                    if not ok.all():
                        self._missing("negative", flat_negs, ok)
                    rows, cols = zip(*slots)
                    neg[list(rows), list(cols)] = self._document[ni]
                out["teacher_negative"] = neg
        if self.has_scores:
            scores = np.zeros((n, 1 + k), np.float32)
            si, ok = _find(self._score_keys, pair_keys(qk, pk))
            if not ok.all():
                self._missing("(query, positive)", positives, ok)
            scores[:, 0] = self._scores[si]
            if flat_negs:
                rows = np.array([i for i, _ in slots])
                si, ok = _find(self._score_keys, pair_keys(qk[rows], nk))
                if not ok.all():
                    self._missing("(query, negative)", flat_negs, ok)
                scores[rows, 1 + np.array([j for _, j in slots])] = self._scores[si]
            out["teacher_scores"] = scores
        return out
