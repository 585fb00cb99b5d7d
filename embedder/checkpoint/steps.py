"""The step directories of a workdir's checkpoints/: which exist, which look complete, their
recorded metrics and the best of them. Plain file reads, no Orbax."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from embedder.checkpoint.trees import TMP_MARKER, TRAIN_ITEMS, read_json


def step_problem(step_dir: pathlib.Path) -> str | None:
    """Why a train-checkpoint step directory is unusable, or None when it looks complete.

    Cheap checks only (files present, JSON parses); unreadable array data shows up at restore.
    Other read errors (EIO, timeouts) prove nothing about the step and propagate.
    """
    if not step_dir.is_dir():
        return "not a directory"
    try:
        read_json(step_dir / "_CHECKPOINT_METADATA")
        for item in TRAIN_ITEMS:
            if not (step_dir / item).is_dir():
                return f"item '{item}' is missing"
        read_json(step_dir / "state" / "_METADATA")
        for item in ("data", "config"):
            read_json(step_dir / item / "metadata")
    except FileNotFoundError as e:
        return f"missing file {pathlib.Path(e.filename).relative_to(step_dir) if e.filename else e}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"unparsable file: {e}"
    if not (step_dir / "state" / "manifest.ocdbt").exists() and not any((step_dir / "state").glob("*.zarray")):
        return "array data of item 'state' is missing"
    return None


def step_dirs(checkpoints: pathlib.Path) -> dict[int, pathlib.Path]:
    """`{step: directory}` of the numbered step directories under `checkpoints` (complete or not)."""
    if not checkpoints.is_dir():
        return {}
    return {int(p.name): p for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()}


def tmp_dirs(checkpoints: pathlib.Path) -> list[pathlib.Path]:
    """The unfinished (Orbax temporary) step directories under `checkpoints`."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if TMP_MARKER in p.name)


def step_metrics(step_dir: pathlib.Path) -> dict | None:
    """The metrics a step recorded with its checkpoint, or None."""
    try:
        return read_json(step_dir / "metrics" / "metrics")
    except (OSError, json.JSONDecodeError):
        return None


def metric_key(metric: str, mode: str):
    """Sort key for BestN/best-step selection: missing metrics rank worst."""
    worst = -np.inf if mode == "max" else np.inf

    def key(metrics) -> float:
        value = (metrics or {}).get(metric)
        return worst if value is None else float(value)

    return key


def best_step(steps: dict[int, pathlib.Path], metric: str, mode: str = "max") -> int | None:
    """The step of `steps` whose recorded `metric` is best (`mode` "max" / "min"; ties: the later
    step), or None when no step recorded it."""
    scored = [(s, (step_metrics(d) or {}).get(metric)) for s, d in steps.items()]
    scored = [(s, float(v)) for s, v in scored if v is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    # Ties go to the later step (more training at equal quality).
    return max(scored, key=lambda sv: (sign * sv[1], sv[0]))[0]
