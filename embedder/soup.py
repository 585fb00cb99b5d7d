"""Model soups (Wortsman et al. 2022): average the parameters of fine-tuned runs into one model.

    python -m embedder.soup --out DIR [--method uniform|greedy|weighted] [--weights 1,2]
                            [--task RETRIEVAL_DIR ...] [--select-task DIR ...] [--split-seed N]
                            [--metric NAME] [--dim D] CKPT [CKPT ...]

Selection never sees the queries you report: `--task DIR` scores only the selection half of a
retrieval task's queries (`embedder.evaluate.query_split`), `python -m embedder.evaluate
--queries report` the other half; soup.json records the tasks and the split.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import pathlib
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from embedder import checkpoint, model_store
from embedder.cli_args import OneLineErrorParser
from embedder.inference import Embedder
# Public here too: expand_ingredients, locate_ingredients, SoupError.
from embedder.soup_ingredients import (SoupError, _locate, expand_ingredients,  # noqa: F401
                                       layer_layout, locate_ingredients, to_layer_layout)

log = logging.getLogger(__name__)

METHODS = ("uniform", "greedy", "weighted")
ScoreFn = Callable[[object, dict], float]


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise SoupError(f"{len(weights)} weights given for {count} ingredients; give one weight per ingredient "
                        "(after sweep directories are expanded to their runs)")
    bad = [w for w in weights if not np.isfinite(w) or w < 0]
    if bad:
        raise SoupError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise SoupError(f"weights sum to {total}; at least one must be positive")
    return [w / total for w in weights]


# ---------------------------------------------------------------- arithmetic

def auto_shardings(location_or_tree):
    """Shards each parameter's largest divisible axis over all devices (replicated otherwise),
    for a located model's on-disk params tree or a tree of `.shape` leaves.

    Returns None on a single device, where host numpy arrays are the cheapest place.
    """
    n = jax.device_count()
    if n == 1:
        return None
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,))

    def place(meta):
        shape = tuple(meta.shape)
        axes = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
        spec = [None] * len(shape)
        if axes:
            spec[axes[0]] = "fsdp"
        return NamedSharding(mesh, PartitionSpec(*spec))

    tree = location_or_tree
    if isinstance(tree, model_store.ModelLocation):
        tree = model_store.param_tree_metadata(tree)
    return jax.tree.map(place, tree)


class RunningSum:
    """float32 sum of weighted parameter trees; holds one tree besides the ingredient being added.

    Each ingredient is cast to float32 and added in the order given (`uniform`: the sum times
    float32(1/N); `weighted`: the sum of float32(w_i / sum w) * p_i), then cast back to the
    ingredients' dtype: bitwise equal to that plain sequential NumPy computation. There is
    deliberately no division: XLA's float32 division is not correctly rounded on CPU (nor on
    TPU), while addition and multiplication are, so the soup does not depend on the backend.
    """

    def __init__(self):
        self.total = None
        self.dtypes = None
        self.count = 0

    def add(self, params, weight: float | None = None) -> None:
        def term(x):
            x = jnp.asarray(x, jnp.float32) if not isinstance(x, jax.Array) else x.astype(jnp.float32)
            return x if weight is None else x * jnp.float32(weight)

        if self.total is None:
            self.dtypes = jax.tree.map(lambda x: x.dtype, params)
            self.total = jax.tree.map(term, params)
        else:
            self.total = jax.tree.map(lambda s, x: s + term(x), self.total, params)
        self.count += 1

    def result(self, divide_by: int | None = None):
        if divide_by:
            scale = np.float32(1.0 / divide_by)
            return jax.tree.map(lambda s, d: (s * scale).astype(d), self.total, self.dtypes)
        return jax.tree.map(lambda s, d: s.astype(d), self.total, self.dtypes)

    def plus(self, params):
        """A new RunningSum with `params` added, leaving this one untouched (for greedy trials)."""
        other = RunningSum()
        other.total, other.dtypes, other.count = self.total, self.dtypes, self.count
        other.add(params)
        return other


# ---------------------------------------------------------------- soups

def make_soup(paths: Sequence, *, method: str = "uniform", weights: Sequence[float] | None = None,
              score_fn: ScoreFn | None = None, best_metric: str | None = None, best_mode: str = "max",
              shard: bool = True):
    """Builds a soup -> `(params, spec, report)`; `report` is what soup.json records.

    `paths`: workdirs (newest step, or best with `best_metric`), checkpoint step directories,
    parameter exports, soups, sweep directories (expanded to their runs), or Hugging Face /
    sentence-transformers folders (converted in memory, as `Embedder.load` does; e.g. WiSE-FT:
    a fine-tuned workdir and its base folder, weighted 1,1). Ingredients of one architecture
    saved in different layer layouts (a `scan_layers=True` run and an unrolled export) are
    brought to the layout of the soup's first ingredient (`embedder.model.layer_stack`), whose
    spec the soup takes; for greedy soups that is the best-scoring ingredient, listed first in
    soup.json. `score_fn(params, spec) -> float` (higher is better) scores ingredients and the
    soup; `greedy` needs it, the other methods use it when given.
    """
    if method not in METHODS:
        raise SoupError(f"unknown soup method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "greedy" and score_fn is None:
        raise SoupError("method 'greedy' needs tasks to score ingredients on: pass --task RETRIEVAL_DIR (its "
                        "selection half of queries) or --select-task DIR (a task you do not report)")
    if weights is not None and method != "weighted":
        raise SoupError(f"--weights only applies to --method weighted (got method {method!r})")
    locations, specs, trees = _locate(paths, best_metric=best_metric, best_mode=best_mode)
    names = [str(loc.directory) for loc in locations]
    # Each ingredient loads in its own layer layout (its own sharding tree) and is then brought
    # to the layout of the soup's first ingredient, placed as that one is.
    shardings = [auto_shardings(tree) for tree in trees] if shard else [None] * len(trees)

    def load(i):
        """Ingredient i as saved -> `(params, spec)`."""
        return model_store.load_located(locations[i], shardings[i])

    def to_soup_layout(i, params, first):
        """Ingredient i's params in the layer layout (and placement) of ingredient `first`."""
        out = to_layer_layout(params, specs[i], layer_layout(trees[first]), names[i])
        if out is not params and shardings[first] is not None:
            out = jax.device_put(out, shardings[first])
        return out

    entries = [{**loc.describe(), "weight": None, "score": None} for loc in locations]
    if method == "greedy":
        params, spec, soup_score = _greedy(locations, specs, load, to_soup_layout, score_fn, entries)
    else:
        norm = normalise_weights(weights if method == "weighted" else None, len(locations))
        acc = RunningSum()
        for i, (entry, w) in enumerate(zip(entries, norm)):
            p, spec = load(i)
            if score_fn is not None:
                entry["score"] = float(score_fn(p, spec))
            acc.add(to_soup_layout(i, p, 0), None if method == "uniform" else w)
            entry["weight"] = w
            del p
        params = acc.result(divide_by=len(locations) if method == "uniform" else None)
        spec = specs[0]
        soup_score = float(score_fn(params, spec)) if score_fn is not None else None
    report = {"method": method, "ingredients": entries, "soup_score": soup_score,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return params, spec, report


def _greedy(locations, specs, load, to_soup_layout, score_fn, entries):
    # Score each ingredient alone, then add them best-first, keeping each only if the soup does not get worse.
    # The best ingredient is the soup's first: its spec and layer layout are the soup's.
    for i, entry in enumerate(entries):
        p, spec = load(i)
        entry["score"] = float(score_fn(p, spec))
        del p
    order = sorted(range(len(locations)), key=lambda i: -entries[i]["score"])
    first = order[0]
    spec = specs[first]
    acc = RunningSum()
    acc.add(load(first)[0])
    soup_score = entries[first]["score"]
    kept = [first]
    for i in order[1:]:
        trial = acc.plus(to_soup_layout(i, load(i)[0], first))
        trial_score = float(score_fn(trial.result(divide_by=trial.count), spec))
        entries[i]["trial_score"] = trial_score
        if trial_score >= soup_score:
            acc, soup_score = trial, trial_score
            kept.append(i)
        del trial
    for i, entry in enumerate(entries):
        entry["weight"] = 1.0 / len(kept) if i in kept else 0.0
    # Ingredients are summed best-first: record that order so the soup can be recomputed.
    entries[:] = [entries[i] for i in order]
    return acc.result(divide_by=acc.count), spec, soup_score


def write_soup(out_dir, params, spec, report, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the soup as a parameter export plus soup.json (loadable by Embedder.load)."""
    return checkpoint.save_params(out_dir, params, spec, overwrite=overwrite,
                                  extra_files={checkpoint.SOUP_FILE: report})


# ---------------------------------------------------------------- scoring

def selection_tasks(split_dirs: Sequence = (), whole_dirs: Sequence = (), *, seed: int = 0):
    """The tasks a soup is scored on -> `(tasks, record)`: the selection half of the queries of
    each retrieval task in `split_dirs` (`embedder.evaluate.query_split`) and the whole of each
    task in `whole_dirs`; `record` is what soup.json says about them."""
    # Here, not at the top: embedder.evaluate imports scikit-learn (~2 s), needed only to score tasks.
    from embedder.evaluate.query_split import describe_split, split_task
    from embedder.evaluate.tasks import load_task

    tasks, split = [], []
    for directory in split_dirs:
        full = load_task(directory)
        tasks.append(split_task(full, "select", seed))
        split.append(describe_split(full, tasks[-1], "select", seed))
    tasks += [load_task(directory) for directory in whole_dirs]
    return tasks, {"tasks": [str(d) for d in split_dirs], "query_split": split,
                   "select_tasks": [str(d) for d in whole_dirs]}


def task_scorer(tasks: Sequence, *, metric: str | None = None, dim: int | None = None,
                max_queries: int | None = None, batch_size: int = 64) -> ScoreFn:
    """Score = mean over tasks (`Task`s or task directories) of `metric` (default: each task
    type's main metric) at `dim` (default: full), on the in-memory params (nothing is written)."""
    # Here, not at the top: embedder.evaluate imports scikit-learn (~2 s), needed only to score tasks.
    from embedder.evaluate.report import MAIN_METRIC
    from embedder.evaluate.runner import evaluate_tasks
    from embedder.evaluate.tasks import Task, load_task

    tasks = [t if isinstance(t, Task) else load_task(t) for t in tasks]

    def score(params, spec) -> float:
        results = evaluate_tasks(Embedder(params, spec), tasks, [dim] if dim else None, batch_size=batch_size,
                                 max_queries=max_queries)
        values = []
        for name, result in results.items():
            key = metric or MAIN_METRIC[result["type"]]
            dims = result["dims"]
            at = dims[str(dim)] if dim else dims[max(dims, key=int)]
            if key not in at:
                raise SoupError(f"task {name} has no metric {key!r}; it reports {sorted(at)}")
            values.append(float(at[key]))
        return float(np.mean(values))

    return score


# ---------------------------------------------------------------- CLI

def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m embedder.soup", description=__doc__.split("\n")[0])
    p.add_argument("ckpts", nargs="+", metavar="CKPT",
                   help="workdir, checkpoint step dir, param export, soup, sweep dir or HF folder")
    p.add_argument("--out", required=True, help="output directory (a param export + soup.json)")
    p.add_argument("--method", choices=METHODS, default="uniform")
    p.add_argument("--weights", type=_floats, help="weighted: one weight per ingredient, e.g. 1,2,1")
    p.add_argument("--task", action="append", default=[], metavar="RETRIEVAL_DIR",
                   help="retrieval task to select on (repeatable): only the selection half of its queries is "
                        "scored; report the other half with python -m embedder.evaluate --queries report")
    p.add_argument("--select-task", action="append", default=[], metavar="DIR",
                   help="task of any type scored whole (repeatable): one you will not report")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the selection/report split of --task queries (default 0; pass the same "
                        "to python -m embedder.evaluate --split-seed)")
    p.add_argument("--metric", help="metric to score by (default: each task type's main metric)")
    p.add_argument("--dim", type=int, help="MRL dim to score at (default: full)")
    p.add_argument("--max-queries", type=int, help="score on a seeded subsample of each task")
    p.add_argument("--best-metric", help="take each workdir's best step by this checkpoint metric")
    p.add_argument("--best-mode", choices=("max", "min"), default="max")
    p.add_argument("--no-shard", action="store_true", help="keep parameters on the host (small models)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # Orbax logs every read/write step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        tasks, selection = selection_tasks(args.task, args.select_task, seed=args.split_seed)
        score_fn = task_scorer(tasks, metric=args.metric, dim=args.dim,
                               max_queries=args.max_queries) if tasks else None
        params, spec, report = make_soup(args.ckpts, method=args.method, weights=args.weights,
                                         score_fn=score_fn, best_metric=args.best_metric,
                                         best_mode=args.best_mode, shard=not args.no_shard)
        report.update(selection, metric=args.metric, dim=args.dim, max_queries=args.max_queries)
        out = write_soup(args.out, params, spec, report, overwrite=args.overwrite)
    except (SoupError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m embedder.soup: error: {e}", file=sys.stderr)
        return 2
    for entry in report["ingredients"]:
        print(f"  {entry['path']}" + (f" step {entry['step']}" if "step" in entry else "")
              + f"  weight {entry['weight']:.4f}" + ("" if entry["score"] is None else f"  score {entry['score']:.4f}"))
    if report["soup_score"] is not None:
        print(f"soup score {report['soup_score']:.4f} (selection queries)")
    for split in selection["query_split"]:
        print(f"  {split['task']}: scored on {split['queries']} of {split['of']} queries; report the other "
              f"{split['of'] - split['queries']} with python -m embedder.evaluate --model {out} "
              f"--task {split['path']} --queries report --split-seed {split['split_seed']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from embedder.cpu_tuning import tune_command

    tune_command()   # this process is ours: the CPU tuning (embedder/cpu_tuning.py)
    sys.exit(main())
