"""The training loop: restore-or-init, AOT-compiled sharded step, metrics, evals, checkpoints.

A run is deterministic in (config, step): the step's RNG is `fold_in(seed, step)`
and the data iterator's state is checkpointed with the train state, so a run
killed at any moment and restarted ends with bitwise-identical parameters.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np

from embedder import sharding
from embedder.train.config import config_to_json, model_spec

log = logging.getLogger("embedder.train")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at step boundaries."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        root.setLevel(logging.INFO)
    # Orbax and grain log every save/read step at INFO through absl; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)


def _batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _format_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _log_memory(compiled, key) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # some backends do not report it
        mem = None
    shapes = ", ".join(f"{k}{list(s)}" for k, s, _ in key if k.endswith("_ids"))
    if mem is None:
        log.info("compiled step for %s", shapes)
        return
    log.info("compiled step for %s: arguments %s, outputs %s, temporaries %s (per device)", shapes,
             _format_bytes(mem.argument_size_in_bytes), _format_bytes(mem.output_size_in_bytes),
             _format_bytes(mem.temp_size_in_bytes))


def _load_init_params(path: str, state_shardings) -> Any:
    """Parameters of `config.init_from` (any saved model or HF folder), placed on the mesh."""
    from embedder.inference import load_params_and_spec

    params, _ = load_params_and_spec(path)
    target = state_shardings.params
    ref_struct = jax.tree_util.tree_structure(target)
    if jax.tree_util.tree_structure(params) != ref_struct:
        raise ValueError(
            f"init_from={path}: its parameter tree does not match config.model "
            f"({jax.tree_util.tree_structure(params)} vs {ref_struct}); set config.model to the "
            "architecture of that checkpoint (e.g. model_config_dict('minilm-l6'))")
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, target)


class Trainer:
    """Holds everything a run needs; `run()` trains to `total_steps`."""

    def __init__(self, config, workdir):
        from embedder.checkpoint import TrainCheckpointer
        from embedder.data.pipeline import make_train_iterator
        from embedder.data.prompts import Prompts
        from embedder.data.tokenizer import load_tokenizer
        from embedder.model import EmbeddingModel
        from embedder.model.config import ModelConfig
        from embedder.train.optim import make_optimizer
        from embedder.train.state import create_train_state
        from embedder.train.step import jit_train_step, make_train_step

        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.is_main = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = model_spec(config)
        if self.is_main:
            cfg = json.loads(config_to_json(config))
            cfg["model_spec"] = self.spec
            (self.workdir / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))

        self.mesh = sharding.make_mesh(config.mesh)
        self.rules = sharding.logical_rules(config)
        self.tokenizer = load_tokenizer(self.spec["tokenizer"], None)
        self.prompts = Prompts.from_spec(self.spec["prompts"])
        self.model = EmbeddingModel(ModelConfig.from_dict(config.model.to_dict()))
        self.optimizer = make_optimizer(config.optimizer, config.total_steps)
        self.data = make_train_iterator(
            config.data, tokenizer=self.tokenizer, prompts=self.prompts,
            global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        self.ckpt = TrainCheckpointer(
            self.workdir, max_to_keep=config.checkpoint.max_to_keep,
            keep_best_metric=config.eval.best_metric or None,
            async_save=config.checkpoint.async_save)

        # Parameters do not depend on the batch; one query-length row traces init.
        example = {"query_ids": (1, int(config.data.query_max_length))}
        with jax.set_mesh(self.mesh):
            self.state, self.state_shardings = create_train_state(
                self.model, self.optimizer, jax.random.key(config.seed), self.mesh, self.rules, example)
        sharding.check_sufficiently_sharded(self.state.params, self.state_shardings.params, self.mesh,
                                            min_size=config.sharding.check_min_size)
        step_fn = make_train_step(self.model, config.loss, self.optimizer,
                                  grad_cache_chunks=config.grad_cache_chunks)
        self.jitted = jit_train_step(step_fn, self.state_shardings, self.mesh)
        self._compiled: dict[tuple, Any] = {}
        self.base_key = jax.random.key(config.seed + 1)

    # -- state -------------------------------------------------------------
    def restore_or_init(self) -> int:
        if self.ckpt.latest_step() is not None:
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                self.state_shardings)
            # No explicit step: the checkpointer falls back past corrupt latest steps.
            self.state, data_state, _ = self.ckpt.restore(abstract_state=abstract)
            self.data.set_state(data_state)
            step = int(jax.device_get(self.state.step))
            log.info("resumed from step %d in %s", step, self.workdir)
            return step
        if self.config.init_from:
            params = _load_init_params(self.config.init_from, self.state_shardings)
            self.state = self.state.replace(params=params)
            log.info("initialised parameters from %s", self.config.init_from)
        return 0

    def compiled_step(self, batch):
        key = _batch_key(batch)
        if key not in self._compiled:
            t0 = time.time()
            with jax.set_mesh(self.mesh):
                lowered = self.jitted.lower(self.state, batch, self.base_key)
                self._compiled[key] = lowered.compile()
            log.info("compile took %.1fs", time.time() - t0)
            _log_memory(self._compiled[key], key)
        return self._compiled[key]

    # -- evaluation ---------------------------------------------------------
    def evaluate(self, step: int, writer: MetricsWriter) -> dict[str, float]:
        tasks = list(self.config.eval.tasks)
        if not tasks:
            return {}
        from embedder.evaluate import evaluate_tasks, flatten_results
        from embedder.inference import Embedder

        dims = tuple(self.config.eval.dims) or tuple(self.config.loss.dims)
        encoder = Embedder(self.state.params, self.spec, tokenizer=self.tokenizer)
        t0 = time.time()
        results = evaluate_tasks(encoder, tasks, dims=dims, batch_size=self.config.eval.batch_size,
                                 max_queries=self.config.eval.max_queries or None)
        flat = flatten_results(results)
        log.info("eval at step %d (%.1fs): %s", step, time.time() - t0,
                 ", ".join(f"{k}={v:.4f}" for k, v in flat.items()))
        if self.is_main:
            (self.workdir / "eval").mkdir(exist_ok=True)
            (self.workdir / "eval" / f"step_{step}.json").write_text(json.dumps(results, indent=1))
        writer.write(step, flat)
        return flat

    # -- the loop -------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.config
        start = self.restore_or_init()
        writer = MetricsWriter(self.workdir, enabled=self.is_main)
        eval_every = cfg.eval.every_steps
        last_eval: dict[str, float] = {}
        if start == 0 and cfg.eval.at_start:
            last_eval = self.evaluate(0, writer)
        pending: list[tuple[int, dict]] = []   # device metrics not yet fetched (no host sync per step)
        last_good_step = start
        t_window, rows_window = time.time(), 0
        bar = tqdm(total=cfg.total_steps, initial=start, desc="train", disable=not self.is_main,
                   dynamic_ncols=True)
        step = start
        preempted = False

        def flush() -> dict:
            nonlocal t_window, rows_window, last_good_step
            if not pending:
                return {}
            fetched = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, fetched):
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {s}; stopping. The last good checkpoint "
                        f"(step {self.ckpt.latest_step()}) is kept in {self.workdir / 'checkpoints'}. "
                        "Lower optimizer.learning_rate, raise loss.temperature, or enable "
                        "optimizer.grad_clip_norm, then rerun to resume from it.")
            last_s, last_m = pending[-1][0], fetched[-1]
            elapsed = max(time.time() - t_window, 1e-9)
            row = {f"train/{k}": float(np.asarray(v)) for k, v in last_m.items() if np.ndim(v) == 0}
            row["train/examples_per_sec"] = rows_window / elapsed
            for reason, count in self.data.skip_counts.items():
                row[f"data/skipped/{reason}"] = count
            writer.write(last_s, row)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", ex_s=f"{row['train/examples_per_sec']:.1f}")
            pending.clear()
            t_window, rows_window = time.time(), 0
            last_good_step = last_s
            return row

        with _Preemption() as preemption:
            while step < cfg.total_steps:
                host_batch = next(self.data)
                batch = sharding.host_to_global(host_batch, self.mesh)
                compiled = self.compiled_step(batch)
                rng = jax.random.fold_in(self.base_key, step)
                self.state, metrics = compiled(self.state, batch, rng)
                step += 1
                rows_window += cfg.batch_size
                pending.append((step, metrics))
                bar.update(1)
                save_now = step % cfg.checkpoint.every_steps == 0 or step == cfg.total_steps
                eval_now = eval_every and step % eval_every == 0 and step != cfg.total_steps
                if step % cfg.log_every == 0 or save_now or eval_now or preemption.requested:
                    flush()
                if eval_now:
                    last_eval = self.evaluate(step, writer)
                if save_now or preemption.requested:
                    self.ckpt.save(step, self.state, self.data.get_state(), cfg.to_dict(),
                                   metrics=last_eval or None, force=preemption.requested)
                if preemption.requested:
                    log.warning("SIGTERM received: saved step %d, exiting", step)
                    preempted = True
                    break
        bar.close()
        self.ckpt.wait()
        if not preempted:
            last_eval = self.evaluate(step, writer) if cfg.eval.tasks else {}
            if cfg.checkpoint.export_params:
                from embedder.checkpoint import save_params

                # Every process takes part (Orbax synchronises); process 0 writes the JSON.
                save_params(self.workdir / "export", self.state.params, self.spec, overwrite=True)
            self._plots()
        writer.close()
        self.ckpt.close()
        return {"step": step, "preempted": preempted, "eval": last_eval, "last_good_step": last_good_step}

    def _plots(self) -> None:
        if not (self.is_main and self.config.eval.tasks):
            return
        try:
            from embedder.evaluate.plots import plot_metrics_vs_step

            plot_metrics_vs_step(self.workdir / "metrics.jsonl", self.workdir / "plots")
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not write plots: %s", e)


def train(config, workdir) -> dict:
    """Trains the experiment `config` in `workdir`, resuming if it holds checkpoints."""
    _setup_logging()
    trainer = Trainer(config, workdir)
    return trainer.run()
