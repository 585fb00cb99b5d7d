"""The Gemma 3 270M recipe's report: results.md / results.json / results.png / learning_curve.png
from a workdir's evaluations and timing."""
from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from experiments import debian_recipe as recipe  # noqa: E402
from experiments.gemma3_270m_settings import REFERENCES  # noqa: E402

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
    per_step = extra.get("median_step_s", {})
    step = [f"{per_step[n]:.1f} s" if n in per_step else "-" for n in rows]
    references = dict(REFERENCES, **{"BM25, no stemming": bm25})
    table = recipe.results_table(rows, COLUMNS, references=references, extra={"wall": wall, "s/step": step})
    stage_walls = ", ".join(f"{k} {v['wall_s'] / 60:.1f} min" for k, v in extra.get("timing", {}).items())
    note = (f"\nThe untrained model has no projection: its 768 column is its 640-dim mean pool. Every choice "
            f"(the greedy soup's ingredients, the exported model) maximised the validation column; "
            f"debian_retrieval and the section tasks were never chosen on. Exported: {extra.get('export', {}).get('model', '-')}. "
            f"Wall: a row's training (or conversion) time, over every start when it was resumed (its step "
            f"times summed); s/step: its median step. Every stage (wall of its last start): {stage_walls}.\n")
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


def scored_rows(run, steps: dict[str, dict[str, float]]) -> tuple[dict[str, dict], dict[str, float]]:
    """Every model scored in the workdir, in recipe order, and its training wall time: a resumed
    stage's `wall_s` is its last start's, so a training row takes its step times over every start
    (`steps`, from `training_steps`) when they sum to more."""
    def wall(label, *stages_):
        return max(sum(run.timing.get(s, {}).get("wall_s", 0.0) for s in stages_),
                   steps.get(label, {}).get("sum_s", 0.0))

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
            rows[label] = run.with_dims(json.loads(out.read_text()), path)
            if stages:
                walls[label] = wall(label, *stages)
    return rows, walls


def finish(run, extra, wd) -> int:
    extra["timing"] = run.timing
    extra["total_wall_s"] = sum(v.get("wall_s", 0.0) for v in run.timing.values())
    extra["peak_rss_gb"] = max((v.get("peak_rss_gb", 0.0) for v in run.timing.values()), default=0.0)
    steps = training_steps(run)
    rows, walls = scored_rows(run, steps)
    extra["median_step_s"] = {label: s["median_s"] for label, s in steps.items()}
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


def training_steps(run) -> dict[str, dict[str, float]]:
    """{row label: median and summed seconds per training step over every start} of stage 1 and
    the stage-2 runs."""
    import statistics

    from experiments.gemma3_270m_stages import step_seconds

    stages = {"1: pre-finetuned": ("stage1", run.s["stage1"]["batch"])}
    stages.update({f"2: {s['name']}": (f"stage2_{s['name']}", run.s["stage2"]["batch"]) for s in run.s["runs"]})
    out = {}
    for label, (name, batch) in stages.items():
        seconds = step_seconds(run.wd / name, batch)
        if seconds:
            out[label] = {"median_s": round(statistics.median(seconds.values()), 2),
                          "sum_s": round(sum(seconds.values()), 1)}
    return out
