"""What the Debian drivers (`minilm_finetune.py`, `gemma3_270m.py`) share: the training pairs in
one seeded order, rows written whole, hard-negative and section-label mining, evaluation cached
per model, and the results table and bar plot."""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import sys
import time
from typing import Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # imported by scripts run from anywhere
    sys.path.insert(0, str(REPO))

TASKS = REPO / "data" / "debian" / "tasks"
TRAIN_PAIRS = REPO / "data" / "debian" / "train_pairs.jsonl.gz"


def read_pairs(path: pathlib.Path, seed: int) -> list[dict]:
    """The training pairs in one seeded order: every stage takes its rows from a disjoint slice
    of it, so no two datasets share a package."""
    from embedder.data.jsonl import iter_jsonl

    records = [r for _, r in iter_jsonl(path)]
    random.Random(seed).shuffle(records)
    return records


def write_rows(out: pathlib.Path, rows) -> None:
    """JSONL rows written to a temporary file and renamed: a killed run leaves no half file."""
    out = pathlib.Path(out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)


def mine(out: pathlib.Path, records: list[dict], n_pairs: int, base, seed: int, log, *,
         num_negatives: int = 1, retriever: str = "model", rank_window: tuple[int, int] = (10, 30),
         corpus: Sequence[str] = ()) -> dict:
    """The first `n_pairs` of `records`, each with `num_negatives` hard negatives from `rank_window`
    (1-based ranks) of the candidates retrieved by the `base` Embedder (`retriever` "model", exact
    top-k) or by BM25 ("bm25", `base` unused), the positive and near-duplicates skipped. The corpus
    is those pairs' documents plus `corpus` (more descriptions, e.g. the other training pairs')."""
    from embedder.synth.negatives import MiningConfig, mine_negatives

    if len(records) < n_pairs:
        raise SystemExit(f"{len(records)} pairs left: too few to mine {n_pairs}; lower the steps or the batch")
    pairs = [{"query": r["query"], "positive": r["positive"]} for r in records[:n_pairs]]
    t0, c0 = time.time(), time.process_time()
    config = MiningConfig(num_negatives=num_negatives, index="exact", seed=seed, retriever=retriever,
                          rank_window=tuple(rank_window))
    mined = list(mine_negatives(pairs, base if retriever == "model" else None, config=config,
                                extra_corpus=[{"text": t} for t in corpus], task="search result"))
    stats = {"pairs": len(mined), "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    write_rows(out, mined)
    log.info("mined %d pairs (%s, ranks %s, corpus %d + %d) in %.0fs", len(mined), retriever, rank_window,
             len(pairs), len(corpus), stats["wall_s"])
    return stats


def mine_sections(out: pathlib.Path, records: list[dict], n_rows: int, skip: int, base, log) -> dict:
    """Classification-style triples from the training pairs' sections: description -> section
    name, negative = the wrong section the `base` Embedder scores highest for that description.
    Every section of `records` is a candidate label (not only the evaluated ones); rows are the
    `n_rows` records after the first `skip` (the retrieval rows)."""
    import numpy as np

    labels = sorted({r["section"] for r in records})
    rows = records[skip: skip + n_rows]
    if len(rows) < n_rows:
        raise SystemExit(f"{len(records)} training pairs: too few for {skip} retrieval rows plus {n_rows} "
                         "section rows; lower the steps or the batch")
    t0, c0 = time.time(), time.process_time()
    label_emb = base.encode(labels, role="document", task="classification")
    text_emb = base.encode([r["positive"] for r in rows], role="query", task="classification")
    scores = np.asarray(text_emb, np.float32) @ np.asarray(label_emb, np.float32).T  # [rows, labels]
    index = {label: i for i, label in enumerate(labels)}
    scores[np.arange(len(rows)), [index[r["section"]] for r in rows]] = -np.inf
    hardest = scores.argmax(axis=1)
    triples = [{"query": r["positive"], "positive": r["section"], "negatives": [labels[j]],
                "task": "classification"} for r, j in zip(rows, hardest)]
    write_rows(out, triples)
    stats = {"rows": len(triples), "labels": len(labels), "wall_s": time.time() - t0,
             "cpu_s": time.process_time() - c0}
    log.info("built %d section rows over %d labels in %.0fs", len(triples), len(labels), stats["wall_s"])
    return stats


class CachedEncoder:
    """An `Embedder` whose full-dim encodings are kept by (role, task, texts, titles), so a
    model's corpus is encoded once however many query sets (halves, subsets) are scored on it."""

    def __init__(self, embedder):
        self.embedder = embedder
        self.cache: dict[str, object] = {}

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        from embedder.mrl import truncate_normalize

        h = hashlib.sha256(json.dumps([role, task, list(texts), None if titles is None else list(titles)]).encode())
        key = h.hexdigest()
        if key not in self.cache:
            self.cache[key] = self.embedder.encode(texts, role=role, task=task, batch_size=batch_size, titles=titles)
        out = self.cache[key]
        return out if dim is None else truncate_normalize(out, dim)


def evaluate_cached(out: pathlib.Path, encoder, tasks: Mapping[str, object], dims: Sequence[int], log, *,
                    batch_size: int = 32, max_queries: int | None = None) -> dict:
    """Scores `encoder` on each task (a `Task` or a task folder) whose key `out` (JSON) lacks,
    and adds it there with the wall time; `encoder` is built only when something is missing,
    when it is a zero-argument callable."""
    from embedder.evaluate.runner import evaluate_task

    out = pathlib.Path(out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    todo = {k: t for k, t in tasks.items() if k not in results}
    if not todo:
        return results
    if callable(encoder) and not hasattr(encoder, "encode"):
        encoder = encoder()
    t0 = time.time()
    for key, task in todo.items():
        results[key] = evaluate_task(encoder, task, tuple(dims), max_queries=max_queries, batch_size=batch_size)
    results.setdefault("_wall_s", {})[",".join(todo)] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    log.info("evaluated %s on %s in %.0fs", out.stem, ", ".join(todo), time.time() - t0)
    return results


def metric(results: dict, key: str, name: str, dim: int) -> float:
    """`results[key]["dims"][dim][name]`, NaN when absent; `results["_dims"]` maps a column's
    dim to the one a narrower model was scored at."""
    dim = results.get("_dims", {}).get(str(dim), dim)
    try:
        return float(results[key]["dims"][str(dim)][name])
    except KeyError:
        return float("nan")


def results_table(rows: Mapping[str, dict], columns: Sequence[tuple[str, str, int, str]], *,
                  references: Mapping[str, Mapping[str, float]] = {}, extra: Mapping[str, Sequence[str]] = {},
                  scale: float = 1.0, digits: int = 3) -> str:
    """A Markdown table: one row per model, `columns` = (task key, metric, dim, header); reference
    rows give values by header; `extra` = {header: one cell per model row} appended on the right."""
    def cell(v):
        return "-" if v != v else f"{scale * v:.{digits}f}"

    heads = [c[3] for c in columns] + list(extra)
    lines = ["| model | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for i, (name, res) in enumerate(rows.items()):
        vals = [cell(metric(res, key, m, dim)) for key, m, dim, _ in columns] + [e[i] for e in extra.values()]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    for name, ref in references.items():
        vals = [cell(ref.get(c[3], float("nan"))) for c in columns] + ["-"] * len(extra)
        lines.append(f"| {name} (reference) | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(rows: Mapping[str, dict], columns: Sequence[tuple[str, str, int, str]], out_png: pathlib.Path, *,
             title: str, hline: tuple[str, float] | None = None) -> None:
    """Grouped bars: one group per model, one bar per column; `hline` = (label, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.5))
    for i, (key, m, dim, label) in enumerate(columns):
        ax.bar([j + width * i for j in range(len(names))], [metric(rows[n], key, m, dim) for n in names],
               width=width, label=label)
    if hline:
        ax.axhline(hline[1], color="k", ls="--", lw=1, label=hline[0])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], out_png: pathlib.Path, *, title: str,
              xlabel: str, ylabel: str, hline: tuple[str, float] | None = None) -> None:
    """One line per series of (x, y) points, e.g. validation nDCG@10 against pairs seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in series.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=name)
    if hline:
        ax.axhline(hline[1], color="k", ls="--", lw=1, label=hline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)

