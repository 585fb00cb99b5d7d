"""Train checkpoints of a workdir (Orbax CheckpointManager): keep-last-N + best, a fallback past a step
proven corrupt (the same fault seen again after a back-off, decided by all hosts together), and
retries of reads that fail with I/O errors."""
from __future__ import annotations

import itertools
import json
import logging
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from embedder.checkpoint.read_faults import CheckpointReadError, StepCorrupt, corruption, describe, is_io_error
from embedder.checkpoint.steps import best_step, metric_key, step_dirs, step_metrics, step_problem, tmp_dirs
from embedder.checkpoint.trees import (CHECKPOINTS_DIR, QUARANTINE_DIR, TRAIN_ITEMS, _check_same_tree, _to_json_value,
                                        read_json, tree_metadata)

log = logging.getLogger(__name__)


_VERDICTS = {type(None): 0, StepCorrupt: 1, CheckpointReadError: 2}   # worse verdicts are larger


def _agreed_verdict(verdict: int) -> int:
    """The worst of every process's `verdict` (each process must call it, in the same order)."""
    if jax.process_count() == 1:
        return verdict
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.array([verdict], np.int32))))


class TrainCheckpointer:
    """Train checkpoints of one workdir: `state` (arrays), `data` and `config` (JSON) per step.

    Keeps the last `max_to_keep` steps plus, with `keep_best_metric`, the best step by
    that metric (`best_mode` "max" or "min"). Saves are asynchronous unless
    `async_save=False`; `wait()` blocks until they are on disk. A restore that fails
    without proof of corruption is tried `restore_attempts` times, waiting
    `restore_backoff_s`, then twice that, ... between tries.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, keep_best_metric: str | None = None,
                 best_mode: str = "max", save_interval_steps: int = 1, async_save: bool = True,
                 restore_attempts: int = 4, restore_backoff_s: float = 2.0):
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
        if int(restore_attempts) < 1 or restore_backoff_s < 0:
            raise ValueError(f"restore_attempts must be >= 1 and restore_backoff_s >= 0, got "
                             f"{restore_attempts}, {restore_backoff_s}")
        self.restore_attempts = int(restore_attempts)
        self.restore_backoff_s = float(restore_backoff_s)
        for tmp in tmp_dirs(self.directory):
            log.warning("ignoring incomplete checkpoint %s (an interrupted save); Orbax removes it", tmp)
        policies = [ocp.checkpoint_managers.LatestN(n=int(max_to_keep))]
        best_fn = None
        if keep_best_metric:
            best_fn = metric_key(keep_best_metric, best_mode)
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
            if step_problem(self.directory / str(step)) is None:
                return step
        return None

    def best_step(self) -> int | None:
        """Best step by `keep_best_metric`; the latest step when no metric is tracked."""
        if not self.keep_best_metric:
            return self.latest_step()
        steps = {s: d for s, d in step_dirs(self.directory).items() if step_problem(d) is None}
        return best_step(steps, self.keep_best_metric, self.best_mode)

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
        carry the target shardings (any mesh). With `step=None` the newest usable step
        is taken: a newer step proven incomplete or corrupt (`step_problem`, or array
        data that does not match its metadata) is moved to `<workdir>/checkpoints_corrupt/`,
        so training can save it anew, and the fallback is logged as an error naming the
        steps lost. Any other read failure is retried, then raises `CheckpointReadError`
        and moves nothing. An explicit `step` that is corrupt raises ValueError.
        """
        self.wait()
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [int(step)]
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        skipped = []
        for candidate in steps:
            # Every host reads, then all take the worst verdict: a fault one host saw (a shard of
            # its own) moves the step aside, or stops the run, on every host alike.
            failure = None
            try:
                state, data_state, config = self._restore_step(candidate, abstract_state)
            except (StepCorrupt, CheckpointReadError) as e:
                failure = e
            verdict = _agreed_verdict(_VERDICTS[type(failure)])
            if verdict == _VERDICTS[CheckpointReadError]:
                raise failure if isinstance(failure, CheckpointReadError) else CheckpointReadError(
                    f"another host could not read checkpoint step {candidate} in {self.directory}; nothing "
                    "was moved (its log says why)")
            if verdict == _VERDICTS[StepCorrupt]:
                e = failure or StepCorrupt("another host found it corrupt (its log says why)")
                if step is not None:
                    raise ValueError(f"checkpoint step {candidate} in {self.directory} is unusable: {e}") from None
                moved = self._quarantine(candidate)
                log.error("skipping checkpoint step %d in %s: %s; moved it to %s",
                          candidate, self.directory, e, moved)
                skipped.append(f"step {candidate}: {e}")
                continue
            if skipped:
                lost = steps[0] - candidate
                log.error("resumed from step %d, not the newest step %d: %d step%s of training lost "
                          "(corrupt, moved to %s: %s)", candidate, steps[0], lost, "" if lost == 1 else "s",
                          self.workdir / QUARANTINE_DIR, "; ".join(skipped))
            return state, data_state, config
        raise FileNotFoundError(f"no usable checkpoint in {self.directory}; skipped: {skipped}")

    def _restore_step(self, step: int, abstract_state):
        """One step's `(state, data_state, config)`; raises StepCorrupt when it is proven unusable."""
        step_dir = self.directory / str(step)

        def read_metadata():
            problem = step_problem(step_dir)
            if problem is not None:
                raise StepCorrupt(problem)
            return tree_metadata(step_dir / "state")

        meta = self._retrying(step, read_metadata)
        if abstract_state is not None:
            # A mismatch is the caller's error, not corruption: raise, never skip.
            _check_same_tree(meta, abstract_state, f"checkpoint step {step}", "abstract_state")
        restored = self._retrying(step, lambda: self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )))
        return restored.state, dict(restored.data or {}), dict(restored.config or {})

    def _retrying(self, step: int, read):
        """`read()`, retried with back-off while it fails with I/O errors. A failure that says the
        step is corrupt (a missing or unparsable file, arrays that disagree with their metadata)
        becomes `StepCorrupt` only when the read after a back-off fails the same way; any other
        exception (a programming error) propagates at once, untried again."""
        suspect = None
        for attempt in itertools.count(1):
            try:
                return read()
            except Exception as e:  # noqa: BLE001 - sorted into corrupt / I/O / other below
                problem = corruption(e)
                if problem is None and not is_io_error(e):
                    raise
                if problem is not None:
                    if problem == suspect or attempt > self.restore_attempts:
                        raise StepCorrupt(problem) from e
                    suspect = problem
                    delay = self.restore_backoff_s * 2 ** (attempt - 1)
                    log.warning("checkpoint step %d looks unusable (%s); reading it again in %.0f s before "
                                "moving it aside", step, problem, delay)
                    time.sleep(delay)
                    continue
                suspect = None
                if attempt >= self.restore_attempts:
                    raise CheckpointReadError(
                        f"could not read checkpoint step {step} in {self.directory} after {attempt} "
                        f"attempts: {describe(e)}; nothing was moved. Fix the cause (storage, memory) "
                        f"and rerun, or move {self.directory / str(step)} aside to resume from an "
                        "older step") from e
                delay = self.restore_backoff_s * 2 ** (attempt - 1)
                log.warning("reading checkpoint step %d failed (attempt %d of %d), retrying in %.0f s: %s",
                            step, attempt, self.restore_attempts, delay, describe(e))
                time.sleep(delay)

    def _quarantine(self, step: int) -> pathlib.Path:
        dest = self.workdir / QUARANTINE_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), dest)
        ocp.multihost.sync_global_processes(f"embedder_quarantine_{step}")
        self._manager.reload()
        return dest

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
