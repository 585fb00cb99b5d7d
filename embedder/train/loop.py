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
# ConfigError: the train CLI catches it from here, with the loop's own errors.
from embedder.train.config import ConfigError, check_config, config_to_json, model_spec  # noqa: F401
from embedder.train.init_from import load_init_params, saved_tokenizer, source_tokenizer
from embedder.train.preemption import Preemption
from embedder.model.heads import model_params
from embedder.train.setup import build_run
from embedder.train.state import abstract_state
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


def default_data_dir(workdir: pathlib.Path) -> pathlib.Path:
    """Where a run with an empty `data.data_dir` keeps its prepared datasets: $TFDS_DATA_DIR when
    set, else WORKDIR/data (WORKDIR/data/host_N with several processes, which each prepare)."""
    if os.environ.get("TFDS_DATA_DIR"):
        return pathlib.Path(os.environ["TFDS_DATA_DIR"])
    data = workdir / "data"
    return data / f"host_{jax.process_index()}" if jax.process_count() > 1 else data


def _log_model(config, spec: dict, tokenizer_file) -> None:
    """One line on what the run trains, saying what came from `init_from`."""
    m, tok = config.model, spec["tokenizer"]
    source = f" (from init_from={config.init_from})" if config.init_from else ""
    heads = f"projection {tuple(m.projection_dims)}" if m.projection_dims else "no projection (mean pooling)"
    prompts = spec["prompts"]
    log.info("model: %s, %d layers, width %d, vocab %d%s; heads: %s, Matryoshka dims %s; "
             "tokenizer: %s %s%s; prompts: %s", m.family, m.num_layers, m.hidden_size, m.vocab_size,
             " with its weights" + source if source else "", heads, tuple(m.mrl_dims) or "(full width)",
             tok.get("kind"), tok.get("file"), source if tokenizer_file is not None else "",
             f"query {prompts.get('query')!r}, document {prompts.get('document')!r}" if prompts else "none (raw text)")


class MetricsWindow:
    """The steps since the last log line: their device metrics, not yet fetched (no host sync per
    step), each with its dataset when the whole batch came from one (homogeneous mixtures), and
    the rows, real tokens and token slots they trained on, for the throughput columns."""

    def __init__(self, dataset_names: list[str], compile_seconds: float):
        self.names = dataset_names
        self.pending: list[tuple[int, dict, int | None]] = []
        self.reset(compile_seconds)

    def reset(self, compile_seconds: float) -> None:
        self.pending.clear()
        self.started, self.compile_at_start = time.time(), compile_seconds
        self.rows = self.tokens = self.slots = 0

    def add(self, step: int, metrics: dict, host_batch: dict, rows: int) -> None:
        self.rows += rows
        real, slots = token_counts(host_batch)
        self.tokens, self.slots = self.tokens + real, self.slots + slots
        ds = host_batch["dataset"]
        self.pending.append((step, metrics, int(ds[0]) if len(ds) and np.all(ds == ds[0]) else None))

    def fetch(self) -> list[tuple[int, dict, int | None]]:
        """`(step, host metrics, dataset)` of every pending step (one device-to-host transfer)."""
        if not self.pending:
            return []
        fetched = jax.device_get([m for _, m, _ in self.pending])
        return [(s, m, d) for (s, _, d), m in zip(self.pending, fetched)]

    def summary(self, fetched: list, compile_seconds: float, process_count: int) -> dict[str, float]:
        """The log line: the last step's scalars, the window's mean losses and its throughput."""
        # Compilation inside the window is not training throughput.
        elapsed = max(time.time() - self.started - (compile_seconds - self.compile_at_start), 1e-9)
        row = {f"train/{k}": float(np.asarray(v)) for k, v in fetched[-1][1].items() if np.ndim(v) == 0}
        row.update(_window_losses([m for _, m, _ in fetched], [d for _, _, d in fetched], self.names))
        row["train/examples_per_sec"] = self.rows / elapsed
        # Real (non-padding) tokens, from this host's rows times the host count; padding_fraction
        # (of the token slots the encoder computes) shows what data.packing saves.
        row["train/tokens_per_sec"] = self.tokens * process_count / elapsed
        row["train/padding_fraction"] = 1.0 - self.tokens / max(self.slots, 1)
        return row


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
            # A resume takes the copy in its workdir: the source may be gone, and is not re-read.
            saved = saved_tokenizer(self.workdir, config.tokenizer.max_length)
            if saved is not None:
                self.spec["tokenizer"], tokenizer_file = saved, self.workdir / saved["file"]
            else:
                self.spec["tokenizer"], tokenizer_file = source_tokenizer(
                    config.init_from, self.workdir, config.tokenizer.max_length)
        _log_model(config, self.spec, tokenizer_file)
        if not config.data.data_dir:
            config.data.data_dir = str(default_data_dir(self.workdir))
        log.info("data: prepared datasets are kept in %s (config.data.data_dir)", config.data.data_dir)
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
            abstract = abstract_state(self.state, self.state_shardings)
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
        encoder = Embedder(model_params(self.state.params), self.spec, tokenizer=self.tokenizer)
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
        eval_every, save_every = int(cfg.eval.every_steps), int(cfg.checkpoint.every_steps)
        has_tasks = bool(cfg.eval.tasks)
        self._last_eval, self._evaluated_at = {}, None
        if start == 0 and cfg.eval.at_start and has_tasks:
            self._last_eval, self._evaluated_at = self.evaluate(0, writer), 0
        window = MetricsWindow(list(self.data.dataset_names), self.compile_seconds)
        last_good_step = step = self._saved_step = start
        while step < total and not preemption.requested:
            step = self._train_step(step, window)
            bar.update(1)
            stopping = preemption.check(step)
            save_now = step % save_every == 0 or step == total or stopping
            # The final evaluation happens before the final save so that step's checkpoint
            # carries its own metrics (best-checkpoint tracking).
            eval_now = has_tasks and ((eval_every and step % eval_every == 0) or step == total)
            if step % cfg.log_every == 0 or save_now or eval_now:
                last_good_step = self._flush(window, writer, bar) or last_good_step
            if eval_now:
                self._last_eval, self._evaluated_at = self.evaluate(step, writer), step
            if save_now:
                self._save(step, self._own_eval(step))
        last_good_step = self._flush(window, writer, bar) or last_good_step
        preempted = preemption.requested and step < total
        if preempted:
            self._stop_preempted(step)
        else:
            self._finish(step, writer)
        return {"step": step, "preempted": preempted, "eval": self._last_eval, "last_good_step": last_good_step}

    def _own_eval(self, step: int) -> dict | None:
        """The metrics of this step's own evaluation, for its checkpoint: an older one would credit
        the checkpoint with another step's quality."""
        return self._last_eval if self._evaluated_at == step else None

    def _train_step(self, step: int, window: "MetricsWindow") -> int:
        """Runs step `step + 1` on the next batch; its metrics stay on the device in `window`."""
        host_batch = next(self.data)
        batch = sharding.host_to_global(host_batch, self.mesh)
        compiled = self.compiled_step(batch)
        rng = jax.random.fold_in(self.base_key, step)
        self.state, metrics = compiled(self.state, batch, rng)
        window.add(step + 1, metrics, host_batch, int(self.config.batch_size))
        return step + 1

    def _flush(self, window: "MetricsWindow", writer: MetricsWriter, bar) -> int | None:
        """Fetches the window's metrics, stops on a non-finite one, writes the log line; returns the
        last step it logged (None when the window was empty)."""
        fetched = window.fetch()
        if not fetched:
            return None
        for s, m, _ in fetched:
            self._check_finite(s, m)
        row = window.summary(fetched, self.compile_seconds, jax.process_count())
        for reason, count in self.data.skip_counts.items():
            row[f"data/skipped/{reason}"] = count
        last_step = fetched[-1][0]
        writer.write(last_step, row)
        bar.set_postfix(loss=f"{row['train/loss_mean']:.4f}", ex_s=f"{row['train/examples_per_sec']:.1f}")
        window.reset(self.compile_seconds)
        return last_step

    def _check_finite(self, step: int, metrics: dict) -> None:
        bad = {k: float(metrics[k]) for k in _MUST_BE_FINITE if k in metrics and not math.isfinite(float(metrics[k]))}
        if not bad:
            return
        self.ckpt.wait()   # so the message names a checkpoint that is on disk
        latest = self.ckpt.latest_step()
        kept = (f"The last good checkpoint (step {latest}) is kept in {self.ckpt.directory}"
                if latest is not None else "No checkpoint was saved before it")
        what = ", ".join(f"{k} is {v}" for k, v in bad.items())
        raise NonFiniteLossError(
            f"{what} at step {step}; stopping. {kept}. Lower optimizer.learning_rate, raise "
            "loss.temperature, or enable optimizer.grad_clip_norm, then rerun to resume from it.")

    def _stop_preempted(self, step: int) -> None:
        if self._saved_step != step:
            # SIGTERM arrived after this step's save decision (e.g. during an evaluation).
            self._save(step, self._own_eval(step))
        if step == 0:
            log.warning("SIGTERM received before the first step: nothing to save, exiting")
        else:
            log.warning("SIGTERM received: saved step %d, exiting; rerun the same command to resume", step)

    def _finish(self, step: int, writer: MetricsWriter) -> None:
        """The end of a completed run: the final evaluation if missing, the export, the plots."""
        if self.config.eval.tasks and self._evaluated_at != step:   # a resumed run that had already finished
            self._last_eval = self.evaluate(step, writer)
        if self.config.checkpoint.export_params:
            # Every process takes part (Orbax synchronises); process 0 writes the JSON.
            save_params(self.workdir / "export", model_params(self.state.params), self.spec, overwrite=True,
                        tokenizer_file=self.tokenizer_source)
        self._plots()

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
