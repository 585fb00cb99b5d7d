"""The teacher pass: a teacher embedder (any model the store loads) run once over JSONL training
records, its embeddings and/or scores written as a signals directory (`embedder.distill.signals`).

Resumable: the texts are encoded in chunks, each saved under `OUT/partial/` as it completes, so a
stopped pass continues where it was; rerunning a finished pass does nothing. A directory holding
another pass's signals is never overwritten unless asked (`overwrite=True`).
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from embedder.data.prompts import DEFAULT_TASK
from embedder.data.records import BadRecordLog, read_jsonl_pairs
from embedder.distill.signals import (SIGNALS_FILE, STORES, VERSION, SignalsError, document_keys, pair_keys,
                                      query_keys)
from embedder.train.workdir_files import write_atomic

PARTIAL = "partial"


def _file_state(path) -> list:
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except OSError:
        return [str(p), "missing"]
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def collect_texts(files: Sequence[str], task: str, on_bad_record: str = "strict", max_text_chars: int = 100_000):
    """The distinct queries `{key: (task, text)}`, documents `{key: (title, text)}` and (query, document)
    key pairs of JSONL `files`, read and validated as the training pipeline reads them."""
    log = BadRecordLog(on_bad_record)
    queries, documents, pairs = {}, {}, set()
    for _, r in read_jsonl_pairs(list(files), log, max_text_chars):
        t = r["task"] or task
        q = int(query_keys([t], [r["query"]])[0])
        queries.setdefault(q, (t, r["query"]))
        p = int(document_keys([r["title"] or None], [r["positive"]])[0])
        documents.setdefault(p, (r["title"] or None, r["positive"]))
        pairs.add((q, p))
        if r["negatives"]:
            for key, text in zip(document_keys([None] * len(r["negatives"]), r["negatives"]), r["negatives"]):
                documents.setdefault(int(key), (None, text))
                pairs.add((q, int(key)))
    return queries, documents, sorted(pairs), log


class _Progress:
    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.start, self.stream = total, 0, time.perf_counter(), stream
        self.encoded = 0

    def advance(self, n: int, encoded: bool):
        self.done += n
        self.encoded += n if encoded else 0
        elapsed = time.perf_counter() - self.start
        rate = self.encoded / elapsed if elapsed > 0 and self.encoded else 0.0
        eta = f", {(self.total - self.done) / rate:.0f} s left" if rate else ""
        print(f"teacher: {self.done}/{self.total} texts ({100 * self.done / max(self.total, 1):.0f}%), "
              f"{rate:.1f} texts/s{eta}", file=self.stream, flush=True)


def _atomic_save(path: pathlib.Path, array: np.ndarray):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def run_teacher(teacher, files: Sequence[str], out, *, task: str = DEFAULT_TASK, store: str = "embeddings",
                batch_size: int = 64, max_length: int | None = None, dtype: str = "float32",
                chunk_texts: int = 2048, on_bad_record: str = "strict", overwrite: bool = False,
                quiet: bool = False) -> dict:
    """Runs `teacher` (a path `Embedder.load` takes, or an `Embedder`) over the records of `files`
    and writes the signals directory `out`; returns its manifest. See the module docstring."""
    if store not in STORES:
        raise SignalsError(f"--store {store!r}: use one of {', '.join(STORES)}")
    if dtype not in ("float32", "float16"):
        raise SignalsError(f"--dtype {dtype!r}: use float32 or float16")
    if not files:
        raise SignalsError("no --data files given")
    out = pathlib.Path(out)
    teacher_name = teacher if isinstance(teacher, (str, os.PathLike)) else getattr(teacher, "name", "embedder")
    fingerprint = {"version": VERSION, "teacher": _file_state(teacher_name) if isinstance(teacher, (str, os.PathLike))
                   else str(teacher_name), "data": [_file_state(f) for f in files], "task": task, "store": store,
                   "max_length": max_length, "dtype": dtype, "on_bad_record": on_bad_record}
    manifest_path = out / SIGNALS_FILE
    if manifest_path.exists() and not overwrite:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            if not quiet:
                print(f"teacher: {out} already holds these signals; nothing to do", file=sys.stderr)
            return manifest
        raise SignalsError(f"{out} already holds teacher signals of another pass (teacher {manifest.get('teacher')}, "
                           f"data {manifest.get('data')}); choose another --out, or pass --overwrite to replace them")
    partial = out / PARTIAL
    if out.exists() and not out.is_dir():
        raise SignalsError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (partial / "partial.json").exists() and not overwrite \
            and not manifest_path.exists():
        raise SignalsError(f"--out {out} is a non-empty directory that holds no teacher signals; choose another "
                           "--out (or pass --overwrite to write into it)")
    if overwrite:
        for name in (SIGNALS_FILE, "query.npy", "query_keys.npy", "document.npy", "document_keys.npy",
                     "scores.npy", "score_keys.npy"):
            (out / name).unlink(missing_ok=True)
    if (partial / "partial.json").exists():
        if json.loads((partial / "partial.json").read_text()) != fingerprint:
            if not overwrite:
                raise SignalsError(f"{partial} holds an unfinished pass with other settings; rerun that command to "
                                   "finish it, choose another --out, or pass --overwrite to start over")
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_atomic(partial / "partial.json", json.dumps(fingerprint))

    queries, documents, pairs, bad = collect_texts(files, task, on_bad_record)
    if not queries:
        raise SignalsError(f"{', '.join(map(str, files))}: no valid records ({bad.summary()})")
    from embedder.inference import Embedder
    model = Embedder.load(teacher) if isinstance(teacher, (str, os.PathLike)) else teacher
    width = int(model.embedding_dim)
    q_keys = np.array(sorted(queries), np.uint64)
    d_keys = np.array(sorted(documents), np.uint64)
    progress = _Progress(len(q_keys) + len(d_keys), sys.stderr if not quiet else open(os.devnull, "w"))
    t0 = time.perf_counter()
    encoded = 0
    for role, keys, table in (("query", q_keys, queries), ("document", d_keys, documents)):
        for c, lo in enumerate(range(0, len(keys), chunk_texts)):
            path = partial / f"{role}_{c:05d}.npy"
            chunk = [table[int(k)] for k in keys[lo:lo + chunk_texts]]
            if path.exists():
                progress.advance(len(chunk), encoded=False)
                continue
            emb = np.zeros((len(chunk), width), np.float32)
            if role == "query":
                by_task = collections.defaultdict(list)
                for i, (t, _) in enumerate(chunk):
                    by_task[t].append(i)
                for t, idx in by_task.items():
                    emb[idx] = model.encode([chunk[i][1] for i in idx], role="query", task=t, dim=width,
                                            batch_size=batch_size, max_length=max_length)
            else:
                emb[:] = model.encode([text for _, text in chunk], role="document", dim=width,
                                      titles=[title for title, _ in chunk], batch_size=batch_size,
                                      max_length=max_length)
            _atomic_save(path, emb.astype(dtype))
            encoded += len(chunk)
            progress.advance(len(chunk), encoded=True)
    seconds = time.perf_counter() - t0

    def gather(role, n):
        parts = [np.load(partial / f"{role}_{c:05d}.npy") for c in range(-(-n // chunk_texts))]
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype)

    q_emb, d_emb = gather("query", len(q_keys)), gather("document", len(d_keys))
    counts = {"queries": int(len(q_keys)), "documents": int(len(d_keys)), "pairs": len(pairs)}
    if store in ("embeddings", "both"):
        for name, array in (("query_keys", q_keys), ("query", q_emb), ("document_keys", d_keys),
                            ("document", d_emb)):
            _atomic_save(out / f"{name}.npy", array)
    if store in ("scores", "both"):
        pq = np.array([p[0] for p in pairs], np.uint64)
        pd = np.array([p[1] for p in pairs], np.uint64)
        qi, di = np.searchsorted(q_keys, pq), np.searchsorted(d_keys, pd)
        scores = np.einsum("nd,nd->n", q_emb[qi].astype(np.float32), d_emb[di].astype(np.float32))
        keys = pair_keys(pq, pd)
        order = np.argsort(keys, kind="stable")
        _atomic_save(out / "score_keys.npy", keys[order])
        _atomic_save(out / "scores.npy", scores[order].astype(np.float32))
    manifest = {"version": VERSION, "teacher": str(teacher_name), "data": [str(f) for f in files], "task": task,
                "store": store, "width": width, "dtype": dtype, "counts": counts,
                "skipped_records": dict(bad.counts), "texts_per_second": encoded / seconds if encoded else None,
                "fingerprint": fingerprint}
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    shutil.rmtree(partial)
    if not quiet:
        print(f"teacher: wrote {out} ({counts['queries']} queries, {counts['documents']} documents, width {width}, "
              f"store {store})", file=sys.stderr)
    return manifest
