"""The training loop: restore-or-init, AOT-compiled sharded step, metrics, evals, checkpoints;
deterministic in (config, step), so a killed and restarted run ends with bitwise the same parameters."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from embedder import sharding
from embedder.checkpoint import TrainCheckpointer, save_params
from embedder.data.batch_schema import token_counts
from embedder.data.pipeline import make_train_iterator
from embedder.data.prompts import Prompts
from embedder.data.tokenizer import load_tokenizer
from embedder.evaluate import evaluate_tasks, flatten_results
from embedder.evaluate.plots import plot_metrics_vs_step
from embedder.inference import Embedder
# ConfigError and check_config are re-exported (they lived here before config.py).
from embedder.train.config import ConfigError, check_config, config_to_json, model_spec  # noqa: F401
from embedder.train.init_from import load_init_params, source_tokenizer
from embedder.train.preemption import Preemption
from embedder.train.setup import build_run
from embedder.train.workdir_files import MetricsWriter, write_config_json

log = logging.getLogger("embedder.train")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


# Test hook: SIGKILL this process right after the async save of this step has started, so
# tests can kill a run in the middle of a save deterministically. Unset in real runs.
_KILL_DURING_SAVE_ENV = "EMBEDDER_TEST_SIGKILL_DURING_SAVE"
# Scalars that must stay finite: a NaN gradient norm means the update already poisoned the
# parameters even when this step's loss (computed before the update) was finite.
_MUST_BE_FINITE = ("loss", "grad_norm")


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        root.setLevel(logging.INFO)
    # Orbax and grain log every save/read step at INFO through absl; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # tensorboardX logs a line per metric name with '@' (e.g. ndcg@10@64) that it rewrites for TB.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)


def _batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _format_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _window_losses(fetched: list[dict], datasets: list, names: list[str]) -> dict[str, float]:
    """`train/loss_mean`: the loss averaged over the steps since the last log line (`train/loss`
    stays the last step's). With several datasets, `train/loss_mean/NAME` averages the steps
    whose whole batch came from NAME (homogeneous mixtures; mixed batches have no per-dataset loss)."""
    losses = [float(np.asarray(m["loss"])) for m in fetched]
    row = {"train/loss_mean": float(np.mean(losses))}
    if len(names) > 1:
        for d in sorted({d for d in datasets if d is not None}):
            row[f"train/loss_mean/{names[d]}"] = float(np.mean([x for x, e in zip(losses, datasets) if e == d]))
    return row


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


class Trainer:
    """Holds everything a run needs; `run()` trains to `total_steps`."""

    def __init__(self, config, workdir):
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.is_main = jax.process_index() == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spec = model_spec(config)
        tokenizer_file = None   # set when the spec names a tokenizer copied from init_from's model
        if config.init_from and not config.tokenizer.file:  # the source model's own tokenizer
            self.spec["tokenizer"], tokenizer_file = source_tokenizer(
                config.init_from, self.workdir, config.tokenizer.max_length)
        if self.is_main:
            cfg = json.loads(config_to_json(config))
            cfg["model_spec"] = self.spec
            write_config_json(self.workdir, cfg)

        self.assembly = build_run(config)
        self.mesh, self.model = self.assembly.mesh, self.assembly.model
        self.tokenizer_source = tokenizer_file
        self.tokenizer = load_tokenizer(self.spec["tokenizer"] if tokenizer_file is None else
                                        dict(self.spec["tokenizer"], file=str(tokenizer_file)), None)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(f"the tokenizer ({self.spec['tokenizer'].get('file')}) has {self.tokenizer.vocab_size} "
                              f"pieces but config.model.vocab_size={config.model.vocab_size}: ids would fall "
                              "outside the embedding table; use the model's own tokenizer")
        self.prompts = Prompts.from_spec(self.spec["prompts"])
        self.data = make_train_iterator(
            config.data, tokenizer=self.tokenizer, prompts=self.prompts,
            global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            row_multiple=sharding.host_row_multiple(self.mesh, config.grad_cache_chunks))
        self.ckpt = TrainCheckpointer(
            self.workdir, max_to_keep=config.checkpoint.max_to_keep,
            keep_best_metric=config.eval.best_metric or None,
            async_save=config.checkpoint.async_save)

        self.state_shardings = self.assembly.state_shardings
        with jax.set_mesh(self.mesh):
            self.state = self.assembly.init_state(jax.random.key(config.seed))
        sharding.check_sufficiently_sharded(self.state.params, self.state_shardings.params, self.mesh,
                                            min_size=config.sharding.check_min_size)
        self.jitted = self.assembly.step
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0   # kept out of examples/s
        self.base_key = jax.random.key(config.seed + 1)

    # -- state -------------------------------------------------------------
    def restore_or_init(self) -> int:
        if self.ckpt.all_steps():
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state,
                self.state_shardings)
            try:
                # No explicit step: the checkpointer skips (and moves aside) corrupt latest steps.
                state, data_state, _ = self.ckpt.restore(abstract_state=abstract)
            except FileNotFoundError as e:
                # Every step was unusable and has been moved aside, so fresh saves can take
                # their step numbers; training starts over.
                log.warning("no usable checkpoint, starting from scratch: %s", e)
            else:
                step = int(jax.device_get(state.step))
                if int(data_state.get("step", -1)) != step:
                    raise RuntimeError(
                        f"checkpoint step {step} in {self.ckpt.directory} holds data-iterator state for "
                        f"step {data_state.get('step')}; it cannot resume exactly. Move that step "
                        "directory aside to resume from the previous one")
                if step > int(self.config.total_steps):
                    raise ConfigError(
                        f"{self.workdir} holds a checkpoint at step {step}, past config.total_steps="
                        f"{self.config.total_steps}; raise --config.total_steps or use a fresh --workdir")
                self.state = state
                self.data.set_state(data_state)
                log.info("resumed from step %d in %s", step, self.workdir)
                return step
        if self.config.init_from:
            params, _ = load_init_params(self.config.init_from, self.state.params, self.model.config)
            self.state = self.state.replace(params=params)
        return 0

    def compiled_step(self, batch):
        key = _batch_key(batch)
        if key not in self._compiled:
            t0 = time.time()
            with jax.set_mesh(self.mesh):
                lowered = self.jitted.lower(self.state, batch, self.base_key)
                self._compiled[key] = lowered.compile()
            seconds = time.time() - t0
            self.compile_seconds += seconds
            log.info("compile took %.1fs", seconds)
            _log_memory(self._compiled[key], key)
        return self._compiled[key]

    # -- evaluation ---------------------------------------------------------
    def evaluate(self, step: int, writer: MetricsWriter) -> dict[str, float]:
        tasks = list(self.config.eval.tasks)
        if not tasks:
            return {}
        dims = tuple(self.config.eval.dims) or self.model.config.matryoshka_dims
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
        # SIGTERM from here on turns into a clean stop at the next step boundary.
        with Preemption() as preemption:
            start = self.restore_or_init()
            writer = MetricsWriter(self.workdir, enabled=self.is_main, resume_step=start)
            bar = tqdm(total=int(self.config.total_steps), initial=start, desc="train", unit="step",
                       disable=not self.is_main, dynamic_ncols=True)
            try:
                return self._train(start, writer, bar, preemption)
            finally:
                bar.close()
                # Also on a NaN stop or any error: in-flight async saves (the last good
                # checkpoints) must reach the disk before the process exits.
                self.ckpt.wait()
                writer.close()
                self.data.close()
                self.ckpt.close()

    def _save(self, step: int, metrics: dict | None) -> None:
        data_state = self.data.get_state()
        # The iterator must have handed out exactly `step` batches, or a resumed run
        # would see different data than an uninterrupted one.
        if int(data_state["step"]) != step:
            raise RuntimeError(f"internal error: saving train step {step} with the data iterator at "
                               f"step {data_state['step']}")
        started = self.ckpt.save(step, self.state, data_state, self.config.to_dict(), metrics=metrics,
                                 force=True)
        self._saved_step = step
        if started and os.environ.get(_KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def _train(self, start: int, writer: MetricsWriter, bar, preemption: Preemption) -> dict:
        cfg = self.config
        total = int(cfg.total_steps)
        eval_every = int(cfg.eval.every_steps)
        save_every = int(cfg.checkpoint.every_steps)
        has_tasks = bool(cfg.eval.tasks)
        last_eval: dict[str, float] = {}
        evaluated_at = None
        if start == 0 and cfg.eval.at_start and has_tasks:
            last_eval, evaluated_at = self.evaluate(0, writer), 0
        # Device metrics not yet fetched (no host sync per step), with the step's dataset when
        # the whole batch came from one (homogeneous mixtures), else None.
        pending: list[tuple[int, dict, int | None]] = []
        names = list(self.data.dataset_names)
        last_good_step = start
        window = {"time": time.time(), "rows": 0, "tokens": 0, "slots": 0, "compile": self.compile_seconds}
        step = start
        self._saved_step = start

        def flush() -> dict:
            nonlocal last_good_step
            if not pending:
                return {}
            fetched = jax.device_get([m for _, m, _ in pending])
            for (s, _, _), m in zip(pending, fetched):
                bad = {k: float(m[k]) for k in _MUST_BE_FINITE if k in m and not math.isfinite(float(m[k]))}
                if bad:
                    self.ckpt.wait()   # so the message names a checkpoint that is on disk
                    latest = self.ckpt.latest_step()
                    kept = (f"The last good checkpoint (step {latest}) is kept in {self.ckpt.directory}"
                            if latest is not None else "No checkpoint was saved before it")
                    what = ", ".join(f"{k} is {v}" for k, v in bad.items())
                    raise NonFiniteLossError(
                        f"{what} at step {s}; stopping. {kept}. Lower optimizer.learning_rate, raise "
                        "loss.temperature, or enable optimizer.grad_clip_norm, then rerun to resume from it.")
            last_s, last_m = pending[-1][0], fetched[-1]
            # Compilation inside the window is not training throughput.
            compile_in_window = self.compile_seconds - window["compile"]
            elapsed = max(time.time() - window["time"] - compile_in_window, 1e-9)
            row = {f"train/{k}": float(np.asarray(v)) for k, v in last_m.items() if np.ndim(v) == 0}
            row.update(_window_losses(fetched, [d for _, _, d in pending], names))
            row["train/examples_per_sec"] = window["rows"] / elapsed
            # Real (non-padding) tokens, from this host's rows times the host count; padding_fraction
            # (of the token slots the encoder computes) shows what data.packing saves.
            row["train/tokens_per_sec"] = window["tokens"] * jax.process_count() / elapsed
            row["train/padding_fraction"] = 1.0 - window["tokens"] / max(window["slots"], 1)
            for reason, count in self.data.skip_counts.items():
                row[f"data/skipped/{reason}"] = count
            writer.write(last_s, row)
            bar.set_postfix(loss=f"{row['train/loss_mean']:.4f}", ex_s=f"{row['train/examples_per_sec']:.1f}")
            pending.clear()
            window.update(time=time.time(), rows=0, tokens=0, slots=0, compile=self.compile_seconds)
            last_good_step = last_s
            return row

        while step < total and not preemption.requested:
            host_batch = next(self.data)
            batch = sharding.host_to_global(host_batch, self.mesh)
            compiled = self.compiled_step(batch)
            rng = jax.random.fold_in(self.base_key, step)
            self.state, metrics = compiled(self.state, batch, rng)
            step += 1
            window["rows"] += cfg.batch_size
            real, slots = token_counts(host_batch)
            window["tokens"] += real
            window["slots"] += slots
            ds = host_batch["dataset"]
            pending.append((step, metrics, int(ds[0]) if len(ds) and np.all(ds == ds[0]) else None))
            bar.update(1)
            stopping = preemption.check(step)
            save_now = step % save_every == 0 or step == total or stopping
            # The final evaluation happens before the final save so that step's checkpoint
            # carries its own metrics (best-checkpoint tracking).
            eval_now = has_tasks and ((eval_every and step % eval_every == 0) or step == total)
            if step % cfg.log_every == 0 or save_now or eval_now:
                flush()
            if eval_now:
                last_eval, evaluated_at = self.evaluate(step, writer), step
            if save_now:
                # Metrics only of this step's own evaluation: an older one would credit this
                # checkpoint with another step's quality.
                self._save(step, last_eval if evaluated_at == step else None)
        flush()
        preempted = preemption.requested and step < total
        if preempted and self._saved_step != step:
            # SIGTERM arrived after this step's save decision (e.g. during an evaluation).
            self._save(step, last_eval if evaluated_at == step else None)
        if preempted and step == 0:
            log.warning("SIGTERM received before the first step: nothing to save, exiting")
        elif preempted:
            log.warning("SIGTERM received: saved step %d, exiting; rerun the same command to resume", step)
        else:
            if has_tasks and evaluated_at != step:   # a resumed run that had already finished
                last_eval = self.evaluate(step, writer)
            if cfg.checkpoint.export_params:
                # Every process takes part (Orbax synchronises); process 0 writes the JSON.
                save_params(self.workdir / "export", self.state.params, self.spec, overwrite=True,
                            tokenizer_file=self.tokenizer_source)
            self._plots()
        return {"step": step, "preempted": preempted, "eval": last_eval, "last_good_step": last_good_step}

    def _plots(self) -> None:
        if not (self.is_main and self.config.eval.tasks):
            return
        try:
            plot_metrics_vs_step(self.workdir / "metrics.jsonl", self.workdir / "plots")
        except Exception as e:  # a plot must never fail a finished run
            log.warning("could not write plots: %s", e)


def train(config, workdir) -> dict:
    """Trains the experiment `config` in `workdir`, resuming if it holds checkpoints."""
    _setup_logging()
    check_config(config)
    trainer = Trainer(config, workdir)
    return trainer.run()
