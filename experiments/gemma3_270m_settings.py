"""The Gemma 3 270M recipe's settings (DEFAULT, QUICK), each stage's training config, and the
stage-1 rows and validation split they are built from (`experiments/gemma3_270m.py` runs them)."""
from __future__ import annotations

import pathlib
import re
import sys

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

