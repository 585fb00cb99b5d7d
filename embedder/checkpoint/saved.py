"""Read access to saved models for the model store: a workdir's usable steps, the model spec of an
export or a train step, and parameter trees (metadata or arrays) of either."""
from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping

from embedder.checkpoint.exports import absolute_tokenizer
from embedder.checkpoint.steps import best_step, step_dirs, step_metrics, step_problem
from embedder.checkpoint.trees import CONFIG_FILE, MODEL_SPEC_FILE, read_json, restore_tree, tree_metadata

log = logging.getLogger(__name__)


def usable_steps(checkpoints: pathlib.Path) -> dict[int, pathlib.Path]:
    """`{step: directory}` of the complete steps under `checkpoints` (a workdir's checkpoints/);
    incomplete ones are skipped with a warning naming the problem."""
    good = {}
    for step, directory in sorted(step_dirs(checkpoints).items()):
        problem = step_problem(directory)
        if problem:
            log.warning("skipping checkpoint step %d of %s: %s", step, checkpoints.parent, problem)
        else:
            good[step] = directory
    return good


def recorded_metrics(steps: dict[int, pathlib.Path]) -> list[str]:
    """The metric names any of `steps` recorded with its checkpoint."""
    return sorted({k for d in steps.values() for k in (step_metrics(d) or {})})


def export_spec(directory: pathlib.Path) -> dict:
    """The model spec of a parameter export (its `model.json`), tokenizer file made absolute."""
    return absolute_tokenizer(read_json(directory / MODEL_SPEC_FILE), directory)


def train_spec(step_dir: pathlib.Path, workdir: pathlib.Path) -> dict:
    """The model spec of a train step: the `model_spec` entry of the step's saved config, else of
    the workdir's config.json; tokenizer file made absolute (it lies in the workdir)."""
    candidates = [step_dir / "config" / "metadata", workdir / CONFIG_FILE]
    for candidate in candidates:
        try:
            config = read_json(candidate)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(config, dict) and isinstance(config.get("model_spec"), dict):
            return absolute_tokenizer(config["model_spec"], workdir)
    raise ValueError(f"no model spec for {step_dir}: neither {candidates[0]} nor {candidates[1]} "
                     "has a 'model_spec' entry (the train loop writes it into config.json)")


def params_metadata(array_dir: pathlib.Path, subtree: str | None = None):
    """The tree (or its `subtree` key) of an Orbax array directory with metadata leaves
    (`.shape`, `.dtype`); no arrays read."""
    tree = tree_metadata(array_dir)
    return tree[subtree] if subtree else tree


def read_params(array_dir: pathlib.Path, subtree: str | None = None, shardings=None, leave_out=()):
    """The arrays of an Orbax array directory (or its `subtree` key): host numpy arrays, or placed
    on `shardings` (a matching tree, or one Sharding for every leaf). `leave_out`: top-level keys
    of the params not to read (with `subtree` only: a partial restore)."""
    tree = tree_metadata(array_dir)
    if subtree and leave_out and isinstance(tree, Mapping) and isinstance(tree.get(subtree), Mapping):
        tree = dict(tree, **{subtree: {k: v for k, v in tree[subtree].items() if k not in leave_out}})
    return restore_tree(array_dir, tree, shardings, subtree=subtree)
