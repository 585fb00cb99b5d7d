"""Distillation side by side on Gemma 3 270M: the recipe's stage 2 with and without a teacher, at
equal steps, same stage-1 start, data, seed and batch, scored on debian_retrieval (CPU, offline).

    python experiments/gemma3_270m.py --workdir workdir/gemma3_270m --stages convert,stage1,mine
    python experiments/minilm_finetune.py --workdir runs/minilm                  # the teacher (or any model)
    python experiments/distill_gemma.py --recipe workdir/gemma3_270m --teacher runs/minilm/train/export \
        --workdir workdir/distill_gemma

From the Gemma recipe's workdir it takes the stage-1 export (the start of both runs) and the
mined retrieval triples (one hard negative each; stage 2's data). The teacher's embeddings of
those triples are stored once (`python -m embedder.distill teacher`, in WORKDIR/signals), then two
stage-2 runs train from the same start with the recipe's stage-2 config (`Recipe.stage2_config`):
`plain` (Matryoshka NCE; `--plain RUN` takes a finished run with exactly that config, such as
the recipe's own stage2_a_seed0) and `distilled` (the same plus embedding matching of query, positive and
negative, `--embedding-weight`, and score KL, `--score-weight`). The teacher and both runs are
scored on debian_retrieval (nDCG@10 at 768 and 128; the teacher at its own width); `results.md`
and `results.json` in WORKDIR. Every part is skipped when its output exists: rerun to continue.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import debian_recipe as recipe  # noqa: E402
from experiments import gemma3_270m  # noqa: E402
from experiments.recipe_workdir import settings_diff  # noqa: E402

RETRIEVAL = recipe.TASKS / "debian_retrieval"


def same_run(run: pathlib.Path, config) -> pathlib.Path:
    """`run`'s export when `run` finished training with `config` (its config.json, data_dir and the
    model spec aside); else SystemExit naming what differs."""
    from embedder.train.config import config_to_json

    saved = run / "config.json"
    if not (run / "export" / "model.json").is_file() or not saved.is_file():
        raise SystemExit(f"--plain {run}: not a finished training workdir (config.json and export/ needed)")
    want, have = json.loads(config_to_json(config)), json.loads(saved.read_text())
    have.pop("model_spec", None)
    for cfg in (want, have):
        cfg.get("data", {}).pop("data_dir", None)
    diff = settings_diff(have, want)
    if diff:
        raise SystemExit(f"--plain {run}: it trained with another config ({diff}); drop --plain to train the plain run")
    return run / "export"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="the gemma3_270m.py workdir (stage1/export, mined.jsonl)")
    p.add_argument("--teacher", required=True, help="the teacher: any model path Embedder.load takes")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps of both runs (default: the recipe's)")
    p.add_argument("--plain", type=pathlib.Path, default=None,
                   help="a finished training workdir to use as the plain run (e.g. the recipe's RECIPE/stage2_a_seed0), "
                        "accepted only when its config.json is the plain run's config (data_dir aside)")
    p.add_argument("--embedding-weight", type=float, default=1.0)
    p.add_argument("--score-weight", type=float, default=1.0)
    p.add_argument("--task", default=str(RETRIEVAL), help="the retrieval task scored")
    p.add_argument("--max-queries", type=int, default=0, help=">0: score that many queries (smoke runs)")
    p.add_argument("--quick", action="store_true", help="the recipe's --quick settings when its workdir has none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("distill_gemma")

    from embedder import Embedder, cpu_tuning
    cpu_tuning.tune_command()
    from embedder.distill.teacher import run_teacher
    from embedder.train.loop import train

    recipe_wd, wd = pathlib.Path(args.recipe), pathlib.Path(args.workdir)
    init, triples = recipe_wd / "stage1" / "export", recipe_wd / "mined.jsonl"
    for path in (init, triples):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python experiments/gemma3_270m.py --workdir {recipe_wd} "
                             "--stages convert,stage1,mine` first")
    saved = recipe_wd / "settings.json"   # the recipe's own settings, so lengths, seed and dtype match
    settings = json.loads(saved.read_text()) if saved.is_file() else \
        dict(gemma3_270m.QUICK if args.quick else gemma3_270m.DEFAULT)
    if args.steps:
        settings["stage2"] = dict(settings["stage2"], steps=args.steps)
    wd.mkdir(parents=True, exist_ok=True)
    signals = wd / "signals"
    teacher = str(pathlib.Path(args.teacher).expanduser())
    run_teacher(teacher, [str(triples)], signals)
    # The recipe's own stage-2 config on the retrieval triples alone (no section or multilingual
    # batches), with the teacher for the distilled run.
    stage = gemma3_270m.Recipe(recipe_wd, settings, None, log)
    plain_st = dict(settings["stage2"], section_share=0.0, multilingual_share=0.0, teacher="")
    runs = {}
    for name, st in (("plain", plain_st),
                     ("distilled", dict(plain_st, teacher=teacher,
                                        distill_weights=(args.embedding_weight, args.score_weight)))):
        out = wd / name
        c = stage.stage2_config(st, triples, wd, signals)
        c.data.data_dir = str(wd / "tfds")
        if name == "plain" and args.plain is not None:
            runs[name] = same_run(args.plain.expanduser().absolute(), c)
            log.info("plain run: %s (its config is the plain run's)", args.plain)
            continue
        if not (out / "export" / "model.json").is_file():
            train(c, out)
        runs[name] = out / "export"
    rows = {}
    for name, path in (("teacher", pathlib.Path(args.teacher)), ("plain", runs["plain"]),
                       ("distilled", runs["distilled"])):
        model = Embedder.load(path)
        dims = tuple(dict.fromkeys(min(d, model.embedding_dim) for d in gemma3_270m.EVAL_DIMS))
        results = recipe.evaluate_cached(wd / "eval" / f"{name}.json", model, {"retrieval": args.task}, dims, log,
                                         max_queries=args.max_queries or None)
        rows[name] = {f"nDCG@10 @{d}": recipe.metric(results, "retrieval", "ndcg_at_10", d) for d in dims}
    steps = settings["stage2"]["steps"]
    lines = [f"Stage 2 from {init}, {steps} steps x {settings['stage2']['batch']} triples, seed {settings['seed']}; "
             f"teacher {args.teacher}; {pathlib.Path(args.task).name}", "", "| model | scores |", "|---|---|"]
    lines += [f"| {name} | {', '.join(f'{k} {v:.3f}' for k, v in r.items())} |" for name, r in rows.items()]
    (wd / "results.md").write_text("\n".join(lines) + "\n")
    (wd / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
