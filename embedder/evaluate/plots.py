"""PNG plots of evaluation results: score vs MRL dim, eval metrics vs training step.

A workdir's `metrics.jsonl` holds one JSON object per line, `{"step": N, ...}`; the
evaluation entries (written by the training loop from `flatten_results`) are

    "eval/<task>/<metric>@<dim>": value      e.g. "eval/DebianRetrieval/ndcg_at_10@256": 0.81

`<task>` is the task's name (task.json `name`, else its folder name; no "/"), `<metric>`
one of the evaluator's names (`ndcg_at_10`, `recall_at_10`, `accuracy`, `accuracy_16shot`,
`v_measure`, `spearman`, `ap`, `map`, ...; never "@"), `<dim>` the MRL dim. Rows without
eval entries (training metrics) are ignored here.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Iterable, Sequence

from embedder.evaluate.report import MAIN_METRIC

_EVAL_KEY = re.compile(r"^eval/(?P<task>[^/]+)/(?P<metric>[^@/]+)@(?P<dim>\d+)$")


def parse_eval_key(key: str) -> tuple[str, str, int] | None:
    """`"eval/<task>/<metric>@<dim>"` -> `(task, metric, dim)`; None for other keys."""
    m = _EVAL_KEY.match(key)
    return (m["task"], m["metric"], int(m["dim"])) if m else None


def read_eval_series(metrics_file) -> dict[tuple[str, str, int], list[tuple[int, float]]]:
    """`{(task, metric, dim): [(step, value), ...]}` from a metrics.jsonl, in step order."""
    path = pathlib.Path(metrics_file)
    series: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line; earlier lines are still good.
                continue
            if "step" not in row:
                raise ValueError(f"{path}:{lineno}: metrics row has no 'step'")
            for key, value in row.items():
                parsed = parse_eval_key(key)
                if parsed is not None and value is not None:
                    series.setdefault(parsed, []).append((int(row["step"]), float(value)))
    for points in series.values():
        points.sort()
    return series


def _pyplot():
    # On first use, not at import: the file-only Agg backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _skip(metric: str) -> bool:
    return metric.endswith("_std")


def plot_metrics_vs_step(metrics_file, out_dir) -> list[pathlib.Path]:
    """One PNG per (task, metric) with a line per MRL dim; returns the files written."""
    return plot_stages([metrics_file], out_dir)


def plot_stages(metrics_files: Sequence, out_dir, labels: Sequence[str] | None = None) -> list[pathlib.Path]:
    """Eval curves of consecutive runs (e.g. pre-finetune then finetune) on one step axis.

    Each run's steps are shifted to start where the previous run ended; a dashed line
    marks each boundary. One PNG per (task, metric), `<task>__<metric>.png`, a line per dim.
    """
    plt = _pyplot()
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [read_eval_series(f) for f in metrics_files]
    labels = list(labels) if labels else [pathlib.Path(f).parent.name for f in metrics_files]
    offsets, offset = [], 0
    for run in runs:
        offsets.append(offset)
        last = max((p[-1][0] for p in run.values()), default=0)
        offset += last
    keys = sorted({(t, m) for run in runs for (t, m, _) in run if not _skip(m)})
    written = []
    for task, metric in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        dims = sorted({d for run in runs for (t, m, d) in run if (t, m) == (task, metric)}, reverse=True)
        for dim in dims:
            xs, ys = [], []
            for run, shift in zip(runs, offsets):
                for step, value in run.get((task, metric, dim), []):
                    xs.append(step + shift)
                    ys.append(value)
            ax.plot(xs, ys, marker="o", label=f"dim {dim}")
        if len(runs) > 1:
            for shift, label in zip(offsets, labels):
                ax.axvline(shift, color="grey", linestyle="--", linewidth=0.8)
                ax.annotate(label, (shift, 1.0), xycoords=("data", "axes fraction"), fontsize=7,
                            va="top", ha="left", rotation=90)
        ax.set(xlabel="step", ylabel=metric, title=f"{task}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"{_safe(task)}__{_safe(metric)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_score_vs_dim(results: dict[str, dict], out_file, metrics: Iterable[str] | None = None) -> pathlib.Path:
    """Score vs MRL dim, a line per (task, metric), from `evaluate_tasks` results.

    `metrics` picks metric names (default: each task type's headline metric)."""
    plt = _pyplot()
    wanted = set(metrics) if metrics is not None else None
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, result in results.items():
        dims = sorted(int(d) for d in result["dims"])
        names = sorted(result["dims"][str(dims[0])]) if wanted is not None else [MAIN_METRIC[result["type"]]]
        for metric in names:
            if (wanted is not None and metric not in wanted) or _skip(metric):
                continue
            ax.plot(dims, [result["dims"][str(d)][metric] for d in dims], marker="o", label=f"{task} {metric}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="MRL dim", ylabel="score", title="score vs embedding dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out_file = pathlib.Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
