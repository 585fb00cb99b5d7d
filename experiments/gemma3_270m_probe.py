"""Short runs of the Gemma 3 270M recipe that differ in one lever, scored on the validation task only.

    python experiments/gemma3_270m_probe.py --recipe ~/runs/gemma3_270m --name lr2e-4 \
        --set '{"lr": 2e-4, "steps": 20, "warmup": 2, "eval_every": 10}'
    python experiments/gemma3_270m_probe.py --recipe ~/runs/gemma3_270m --stage 2 --name bm25 \
        --set '{"miner": "bm25", "rank_window": [1, 10], "mine_corpus": "rest"}'

`--recipe` is a workdir of `gemma3_270m.py` after its convert stage (the converted model and the
validation task are read from it, never written). Each probe trains stage 1 from the converted
model on the same training pairs (validation packages left out) and records the validation
task's nDCG@10 every `eval_every` steps in `PROBES/NAME/run/metrics.jsonl`; `--table` prints every
probe's curve. The test tasks are not scored: probes choose, the recipe's table reports.
Keys of `--set`: a stage-1 setting (steps, batch, chunks, lr, warmup, eval_every), a recipe
setting (query_max_length, document_max_length, temperature, dtype), or `frozen` (regexes).

`--stage 2` probes stage 2 instead: it starts from the recipe's stage-1 export (after its stage1
stage) and trains on the stage-2 rows with hard negatives mined for the probe. Extra keys:
`section_share` (of the recipe's section rows), `multilingual_share` (data/multilingual's
training pairs, the validation families left out), `teacher` (a model to distil from) and
`distill_weights` ([embedding matching, score KL]), `miner` ("model": the stage-1 model, as the
recipe; "bm25"), `rank_window` ([first, last] 1-based ranks the negative is drawn from) and
`mine_corpus` ("rows": the stage-2 rows' descriptions, as the recipe; "rest": plus every later
training pair's description).
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import debian_recipe as recipe  # noqa: E402
from experiments import gemma3_270m as driver  # noqa: E402

STAGE1_KEYS = ("steps", "batch", "chunks", "lr", "warmup", "eval_every")
STAGE2_KEYS = STAGE1_KEYS + ("section_share", "multilingual_share", "teacher", "distill_weights", "miner",
                             "rank_window", "mine_corpus")
RECIPE_KEYS = ("query_max_length", "document_max_length", "temperature", "dtype")


def _settings(recipe_dir: pathlib.Path, overrides: dict, stage: str, keys: tuple[str, ...]):
    unknown = sorted(set(overrides) - set(keys) - set(RECIPE_KEYS) - {"frozen"})
    if unknown:
        raise SystemExit(f"--set: unknown key(s) {unknown}; use {', '.join(keys + RECIPE_KEYS)} or frozen")
    settings = json.loads((recipe_dir / "settings.json").read_text())
    settings[stage].update({k: v for k, v in overrides.items() if k in keys})
    settings.update({k: v for k, v in overrides.items() if k in RECIPE_KEYS})
    settings["dtype"] = driver.resolve_dtype(settings["dtype"])
    return settings, driver.Recipe(recipe_dir, settings, None, logging.getLogger("probe"))


def _finish_config(c, run, out: pathlib.Path, st: dict, overrides: dict):
    validation = run.need(run.validation_dir / "task.json", "probe", "convert").parent
    c.data.data_dir = str(out / "tfds")
    c.eval.tasks = (str(validation),)
    c.eval.every_steps = int(st.get("eval_every") or st["steps"])
    c.checkpoint.every_steps = c.eval.every_steps   # a killed probe resumes from its last evaluation
    if "frozen" in overrides:
        c.optimizer.frozen = tuple(overrides["frozen"])
    return c


def probe_config(recipe_dir: pathlib.Path, out: pathlib.Path, overrides: dict):
    """The stage-1 config of a probe and the settings it ran with."""
    settings, run = _settings(recipe_dir, overrides, "stage1", STAGE1_KEYS)
    base = run.need(run.base / "model.json", "probe", "convert").parent
    st = settings["stage1"]
    titles, spans = driver.title_passage_rows(run.records()[: st["steps"] * st["batch"]])
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_rows(out / "titles.jsonl", titles)
    recipe.write_rows(out / "spans.jsonl", spans)
    c = driver.get_config("stage1", settings, run.source_model())
    c.init_from = str(base)
    c.data.datasets = [
        {"name": "titles", "files": [str(out / "titles.jsonl")], "task": "search result", "weight": float(len(titles))},
        {"name": "spans", "files": [str(out / "spans.jsonl")], "task": "search result", "weight": float(len(spans))}]
    return _finish_config(c, run, out, st, overrides), settings


def probe_config_stage2(recipe_dir: pathlib.Path, out: pathlib.Path, overrides: dict):
    """The stage-2 config of a probe (from the recipe's stage-1 export, negatives mined for the
    probe into OUT/mined.jsonl) and the settings it ran with."""
    settings, run = _settings(recipe_dir, overrides, "stage2", STAGE2_KEYS)
    run.need(recipe_dir / "stage1" / "export", "probe --stage 2", "stage1")
    st = settings["stage2"]
    out.mkdir(parents=True, exist_ok=True)
    mined = out / "mined.jsonl"
    if not mined.is_file():
        run.mine_retrieval(mined, st)
    c = run.stage2_config(st, mined, out, out / "signals")
    return _finish_config(c, run, out, st, overrides), settings


def curves(probes: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """{probe: [(step, validation nDCG@10 @768), ...]} of every probe under `probes`."""
    key = f"eval/{driver.VALIDATION}/ndcg_at_10@768"
    out = {}
    for metrics in sorted(probes.glob("*/run/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        out[metrics.parent.parent.name] = [(int(r["step"]), round(float(r[key]), 4)) for r in rows if key in r]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", required=True, type=pathlib.Path, help="a gemma3_270m.py workdir (after convert)")
    p.add_argument("--probes", type=pathlib.Path, help="where probes go (default: RECIPE/probes)")
    p.add_argument("--name", help="this probe's folder name")
    p.add_argument("--stage", type=int, choices=(1, 2), default=1,
                   help="1: stage 1 from the converted model (default); 2: stage 2 from the recipe's stage-1 export")
    p.add_argument("--set", default="{}", help="JSON object of the settings this probe changes")
    p.add_argument("--table", action="store_true", help="print every probe's validation curve and exit")
    args = p.parse_args(argv)
    probes = (args.probes or args.recipe / "probes").expanduser().absolute()
    if args.table:
        print(json.dumps(curves(probes), indent=1))
        return 0
    if not args.name:
        p.error("--name is required unless --table")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = probes / args.name
    make = probe_config if args.stage == 1 else probe_config_stage2
    config, settings = make(args.recipe.expanduser().absolute(), out, json.loads(args.set))
    from embedder.train.loop import train

    t0 = time.time()
    train(config, out / "run")
    (out / "probe.json").write_text(json.dumps({"stage": args.stage, "set": json.loads(args.set), "settings": settings,
                                                "wall_s": round(time.time() - t0, 1),
                                                "curve": curves(probes).get(args.name, [])}, indent=1))
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command(restart=True)
    sys.exit(main())
