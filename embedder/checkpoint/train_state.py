"""Train checkpoints of a workdir (Orbax CheckpointManager): keep-last-N + best, corrupt-step fallback."""
from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from embedder.checkpoint.trees import (_TMP_MARKER, CHECKPOINTS_DIR, QUARANTINE_DIR, TRAIN_ITEMS,
                                        _check_same_tree, _read_json, _to_json_value, _tree_metadata)

log = logging.getLogger(__name__)


def _step_problem(step_dir: pathlib.Path) -> str | None:
    """Why a train-checkpoint step directory is unusable, or None when it looks complete.

    Cheap checks only (files present, JSON parses); unreadable array data shows up at restore.
    """
    if not step_dir.is_dir():
        return "not a directory"
    try:
        _read_json(step_dir / "_CHECKPOINT_METADATA")
        for item in TRAIN_ITEMS:
            if not (step_dir / item).is_dir():
                return f"item '{item}' is missing"
        _read_json(step_dir / "state" / "_METADATA")
        for item in ("data", "config"):
            _read_json(step_dir / item / "metadata")
    except FileNotFoundError as e:
        return f"missing file {pathlib.Path(e.filename).relative_to(step_dir) if e.filename else e}"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return f"unreadable file: {e}"
    if not (step_dir / "state" / "manifest.ocdbt").exists() and not any((step_dir / "state").glob("*.zarray")):
        return "array data of item 'state' is missing"
    return None


def _step_dirs(checkpoints: pathlib.Path) -> dict[int, pathlib.Path]:
    if not checkpoints.is_dir():
        return {}
    return {int(p.name): p for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()}


def _tmp_dirs(checkpoints: pathlib.Path) -> list[pathlib.Path]:
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if _TMP_MARKER in p.name)


def _step_metrics(step_dir: pathlib.Path) -> dict | None:
    try:
        return _read_json(step_dir / "metrics" / "metrics")
    except (OSError, json.JSONDecodeError):
        return None


def _metric_key(metric: str, mode: str):
    """Sort key for BestN/best-step selection: missing metrics rank worst."""
    worst = -np.inf if mode == "max" else np.inf

    def key(metrics) -> float:
        value = (metrics or {}).get(metric)
        return worst if value is None else float(value)

    return key


def _best_step(steps: dict[int, pathlib.Path], metric: str, mode: str) -> int | None:
    scored = [(s, (_step_metrics(d) or {}).get(metric)) for s, d in steps.items()]
    scored = [(s, float(v)) for s, v in scored if v is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    # Ties go to the later step (more training at equal quality).
    return max(scored, key=lambda sv: (sign * sv[1], sv[0]))[0]


class TrainCheckpointer:
    """Train checkpoints of one workdir: `state` (arrays), `data` and `config` (JSON) per step.

    Keeps the last `max_to_keep` steps plus, with `keep_best_metric`, the best step by
    that metric (`best_mode` "max" or "min"). Saves are asynchronous unless
    `async_save=False`; `wait()` blocks until they are on disk.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, keep_best_metric: str | None = None,
                 best_mode: str = "max", save_interval_steps: int = 1, async_save: bool = True):
        if max_to_keep is None or int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if int(save_interval_steps) < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS_DIR
        self.keep_best_metric = keep_best_metric
        self.best_mode = best_mode
        for tmp in _tmp_dirs(self.directory):
            log.warning("ignoring incomplete checkpoint %s (an interrupted save); Orbax removes it", tmp)
        policies = [ocp.checkpoint_managers.LatestN(n=int(max_to_keep))]
        best_fn = None
        if keep_best_metric:
            best_fn = _metric_key(keep_best_metric, best_mode)
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=int(save_interval_steps),
            best_fn=best_fn,  # makes Orbax store each step's metrics
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=TRAIN_ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step that looks complete (see `restore` for the full fallback)."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            if _step_problem(self.directory / str(step)) is None:
                return step
        return None

    def best_step(self) -> int | None:
        """Best step by `keep_best_metric`; the latest step when no metric is tracked."""
        if not self.keep_best_metric:
            return self.latest_step()
        steps = {s: d for s, d in _step_dirs(self.directory).items() if _step_problem(d) is None}
        return _best_step(steps, self.keep_best_metric, self.best_mode)

    def save(self, step: int, state, data_state: dict, config: dict, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving `step` (asynchronously); returns whether a save was started.

        Off-interval steps are skipped unless `force`; a step already on disk is skipped.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if metrics is not None:
            metrics = {str(k): float(np.asarray(v)) for k, v in metrics.items()
                       if np.asarray(v).size == 1}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_to_json_value(dict(data_state or {}))),
            config=ocp.args.JsonSave(_to_json_value(dict(config or {}))),
        )
        return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

    def restore(self, step: int | None = None, abstract_state=None):
        """Restores `(state, data_state, config)`.

        `abstract_state` is the train state with `jax.ShapeDtypeStruct` leaves that
        carry the target shardings (any mesh). With `step=None` the newest usable
        step is taken: incomplete or corrupt newer steps are skipped with a warning
        and moved to `<workdir>/checkpoints_corrupt/` so training can save them anew.
        An explicit `step` that is unusable raises.
        """
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [int(step)]
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        skipped = []
        for candidate in steps:
            step_dir = self.directory / str(candidate)
            problem = _step_problem(step_dir)
            meta = None
            if problem is None:
                try:
                    meta = _tree_metadata(step_dir / "state")
                except Exception as e:  # noqa: BLE001 - unreadable metadata is corruption
                    problem = f"unreadable array metadata: {type(e).__name__}: {str(e)[:300]}"
            if meta is not None:
                if abstract_state is not None:
                    # A mismatch is the caller's error, not corruption: raise, never skip.
                    _check_same_tree(meta, abstract_state, f"checkpoint step {candidate}", "abstract_state")
                try:
                    restored = self._manager.restore(candidate, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                    ))
                    if skipped:
                        log.warning("resumed from step %d after skipping %s", candidate, skipped)
                    return restored.state, dict(restored.data or {}), dict(restored.config or {})
                except Exception as e:  # noqa: BLE001 - any read failure of a complete-looking step
                    problem = f"restore failed: {type(e).__name__}: {str(e)[:300]}"
            if step is not None:
                raise ValueError(f"checkpoint step {candidate} in {self.directory} is unusable: {problem}")
            log.warning("skipping checkpoint step %d in %s: %s", candidate, self.directory, problem)
            skipped.append((candidate, problem))
            self._quarantine(candidate)
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}; skipped: {skipped}")

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            dest = self.workdir / QUARANTINE_DIR / f"{step}-{int(time.time())}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        ocp.multihost.sync_global_processes(f"embedder_quarantine_{step}")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
