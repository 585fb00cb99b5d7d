"""Plain-text table of evaluation results (one row per task, metric and dim)."""
from __future__ import annotations

# The headline metric of each task type comes first in the table.
MAIN_METRIC = {
    "retrieval": "ndcg_at_10",
    "classification": "accuracy",
    "clustering": "v_measure",
    "sts": "spearman",
    "pair_classification": "ap",
    "reranking": "map",
    "bitext_mining": "f1",  # MTEB's main score; `accuracy` is recall@1
}


def format_table(results: dict[str, dict]) -> str:
    """Rows `task | type | metric | <dim> ...`, main metric first, `_std` entries left out."""
    dims = sorted({int(d) for r in results.values() for d in r["dims"]}, reverse=True)
    header = ["task", "type", "metric"] + [str(d) for d in dims]
    rows = []
    for name, result in results.items():
        metrics = list(next(iter(result["dims"].values())))
        main = MAIN_METRIC.get(result["type"])
        metrics.sort(key=lambda m: (m != main, m))
        for metric in metrics:
            if metric.endswith("_std"):
                continue
            cells = []
            for d in dims:
                value = result["dims"].get(str(d), {}).get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
            rows.append([name, result["type"], metric] + cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
