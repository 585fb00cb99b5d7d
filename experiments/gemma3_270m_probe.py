"""Short stage-1 runs of the Gemma 3 270M recipe that differ in one lever, scored on the validation task only.

    python experiments/gemma3_270m_probe.py --recipe ~/runs/gemma3_270m --name lr2e-4 \
        --set '{"lr": 2e-4, "steps": 20, "warmup": 2, "eval_every": 10}'

`--recipe` is a workdir of `gemma3_270m.py` after its convert stage (the converted model and the
validation task are read from it, never written). Each probe trains stage 1 from the converted
model on the same training pairs (validation packages left out) and records the validation
task's nDCG@10 every `eval_every` steps in `PROBES/NAME/run/metrics.jsonl`; `--table` prints every
probe's curve. The test tasks are not scored: probes choose, the recipe's table reports.
Keys of `--set`: a stage-1 setting (steps, batch, chunks, lr, warmup, eval_every), a recipe
setting (query_max_length, document_max_length, temperature, dtype), or `frozen` (regexes).
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
RECIPE_KEYS = ("query_max_length", "document_max_length", "temperature", "dtype")


def probe_config(recipe_dir: pathlib.Path, out: pathlib.Path, overrides: dict):
    """The stage-1 config of a probe and the settings it ran with."""
    unknown = sorted(set(overrides) - set(STAGE1_KEYS) - set(RECIPE_KEYS) - {"frozen"})
    if unknown:
        raise SystemExit(f"--set: unknown key(s) {unknown}; use {', '.join(STAGE1_KEYS + RECIPE_KEYS)} or frozen")
    settings = json.loads((recipe_dir / "settings.json").read_text())
    settings["stage1"].update({k: v for k, v in overrides.items() if k in STAGE1_KEYS})
    settings.update({k: v for k, v in overrides.items() if k in RECIPE_KEYS})
    settings["dtype"] = driver.resolve_dtype(settings["dtype"])
    run = driver.Recipe(recipe_dir, settings, None, logging.getLogger("probe"))
    base = run.need(run.base / "model.json", "probe", "convert").parent
    validation = run.need(run.validation_dir / "task.json", "probe", "convert").parent
    st = settings["stage1"]
    titles, spans = driver.title_passage_rows(run.records()[: st["steps"] * st["batch"]])
    out.mkdir(parents=True, exist_ok=True)
    recipe.write_rows(out / "titles.jsonl", titles)
    recipe.write_rows(out / "spans.jsonl", spans)
    c = driver.get_config("stage1", settings, run.source_model())
    c.init_from = str(base)
    c.data.data_dir = str(out / "tfds")
    c.data.datasets = [
        {"name": "titles", "files": [str(out / "titles.jsonl")], "task": "search result", "weight": float(len(titles))},
        {"name": "spans", "files": [str(out / "spans.jsonl")], "task": "search result", "weight": float(len(spans))}]
    c.eval.tasks = (str(validation),)
    c.eval.every_steps = int(st.get("eval_every") or st["steps"])
    c.checkpoint.every_steps = st["steps"]
    if "frozen" in overrides:
        c.optimizer.frozen = tuple(overrides["frozen"])
    return c, settings


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
    config, settings = probe_config(args.recipe.expanduser().absolute(), out, json.loads(args.set))
    from embedder.train.loop import train

    t0 = time.time()
    train(config, out / "run")
    (out / "probe.json").write_text(json.dumps({"set": json.loads(args.set), "settings": settings,
                                                "wall_s": round(time.time() - t0, 1),
                                                "curve": curves(probes).get(args.name, [])}, indent=1))
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command(restart=True)
    sys.exit(main())
