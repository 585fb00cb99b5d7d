"""`make demo`: the whole recipe on the shipped Debian data with a tiny from-scratch encoder.

Stages (each a normal `python -m embedder.train` run, so each resumes by itself):
  1. pre-finetune on (synopsis, description) pairs, large batch via the gradient cache;
  2. mine hard negatives for the training pairs with the stage-1 model;
  3. finetune from stage 1 with the mined hard negatives, task-homogeneous batches;
then a before/after table (printed, and written to WORKDIR/results.md and .json)
and a plot of the evaluation curves.

    python -m embedder.demo --workdir workdir/demo [--quick]
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import pathlib
import sys
import time

from embedder.synth.records import read_pairs

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "demo.py"

# The trainer, JAX and the evaluators are imported inside the functions, after main() has set up
# logging: importing the trainer installs a root log handler, which would make basicConfig a no-op.


def _load_config(arg: str, overrides: dict):
    spec = importlib.util.spec_from_file_location("demo_experiment", EXPERIMENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


# (task metric, column title): the headline numbers of the shipped tasks (data/README.md).
HEADLINE = (("ndcg_at_10", "nDCG@10"), ("recall_at_10", "R@10"), ("accuracy_16shot", "acc 16-shot"),
            ("accuracy", "acc all"), ("v_measure", "V-measure"))


def results_table(evals: dict[str, dict], dims) -> str:
    """Markdown table: one row per model, the headline metric of each task at each dim."""
    columns = []
    for dim in dims:
        for metric, title in HEADLINE:
            keys = sorted(k for flat in evals.values() for k in flat
                          if k.endswith(f"/{metric}@{dim}"))
            for key in dict.fromkeys(keys):
                columns.append((key, f"{title} @{dim}"))
    header = ["model"] + [title for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, flat in evals.items():
        cells = [f"{flat[k]:.3f}" if k in flat else "-" for k, _ in columns]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdir/demo", help="where the three stages write")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps per stage on a data subset (a smoke test, not the demo)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax logs every read/write step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from embedder.train.loop import train

    workdir = pathlib.Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    quick = {"total_steps": 4, "eval.max_queries": 200, "checkpoint.every_steps": 2,
             "optimizer.warmup_steps": 1} if args.quick else {}
    t0 = time.time()

    stage1_dir = workdir / "1_prefinetune"
    stage1 = train(_load_config("prefinetune", quick), stage1_dir)

    mined = workdir / "mined_negatives.jsonl"
    if not mined.exists():
        mine_debian_negatives(stage1_dir, mined, num_negatives=1, limit=2000 if args.quick else None)

    stage2_dir = workdir / "2_finetune"
    stage2 = train(_load_config(f"finetune@{workdir}", quick), stage2_dir)

    untrained = _first_eval(stage1_dir)
    evals = {"untrained": untrained, "1: pre-finetuned": stage1["eval"], "2: finetuned": stage2["eval"]}
    dims = list(_load_config("prefinetune", quick).eval.dims)
    table = results_table(evals, dims)
    elapsed = time.time() - t0
    text = (f"# Demo results ({elapsed / 60:.1f} min; retrieval: debian_retrieval, classification and "
            f"clustering: debian sections; @d = Matryoshka dim)\n\n{table}\n")
    (workdir / "results.md").write_text(text)
    (workdir / "results.json").write_text(json.dumps({"dims": dims, "evals": evals, "seconds": elapsed},
                                                     indent=1))
    _plot(workdir, [stage1_dir, stage2_dir])
    print("\n" + text)
    print(f"workdir: {workdir}  (results.md, results.json, plots/, 1_prefinetune/, 2_finetune/)")
    return 0


def mine_debian_negatives(model_dir, out_file, *, num_negatives: int, limit=None) -> dict:
    """Hard negatives for the shipped training pairs, mined with the model in `model_dir`."""
    from embedder.inference import Embedder
    from embedder.synth.negatives import MiningConfig, mine_negatives

    # The evaluation corpus has no titles: drop the package-name title read_pairs derives, so
    # training documents look like evaluation documents ("title: none | text: ...").
    records = [{k: v for k, v in r.items() if k != "title"}
               for r in read_pairs(REPO / "data/debian/train_pairs.jsonl.gz", strict=True)]
    if limit:
        records = records[:limit]
    encoder = Embedder.load(model_dir)
    counts = collections.Counter()
    tmp = pathlib.Path(str(out_file) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in mine_negatives(records, encoder, config=MiningConfig(num_negatives=num_negatives),
                                  task="search result", miner_name=str(model_dir), batch_size=256,
                                  counts=counts):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.rename(out_file)  # only a complete file counts as mined
    logging.info("mined %d hard negatives for %d pairs: %s", num_negatives, len(records), dict(counts))
    return dict(counts)


def _first_eval(run_dir: pathlib.Path) -> dict:
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("step") == 0 and any(k.startswith("eval/") for k in row):
            return {k: v for k, v in row.items() if k.startswith("eval/")}
    return {}


def _plot(workdir: pathlib.Path, run_dirs) -> None:
    from embedder.evaluate.plots import plot_stages

    plot_stages([d / "metrics.jsonl" for d in run_dirs], workdir / "plots",
                labels=["pre-finetune", "finetune"])


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()   # this process is ours: the CPU tuning (embedder/cpu_tuning.py)
    sys.exit(main())
