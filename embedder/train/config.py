"""The training config schema: `base_config()` holds every field with its default, and
`check_config` rejects settings that cannot run (experiments start from `base_config()`)."""

from __future__ import annotations

import inspect
import json
import pathlib
from typing import Any, Mapping

import ml_collections

from embedder.data.data_config import default_data_config
from embedder.train.loss_options import LOSS_FUNCTIONS
from embedder.model.config import get_model_config

ConfigDict = ml_collections.ConfigDict


def model_config_dict(name: str, **overrides) -> ConfigDict:
    """The named architecture as a ConfigDict, so each field is overridable."""
    return ConfigDict(get_model_config(name, **overrides).to_dict())


def loss_defaults() -> dict[str, Any]:
    """The loss options and their defaults: the keyword-only arguments of the step's loss functions
    (`train.loss_options.LOSS_FUNCTIONS`: `matryoshka_nce` and the distillation losses); an option several
    take (`dims`, `dim_weights`, `mask_duplicates`) is one option, given to each."""
    out: dict[str, Any] = {}
    for fn in LOSS_FUNCTIONS:
        for name, p in inspect.signature(fn).parameters.items():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            if name in out and out[name] != p.default:
                raise TypeError(f"loss option {name!r} has defaults {out[name]!r} and {p.default!r} in two "
                                f"loss functions ({fn.__name__}); shared options need one default")
            out.setdefault(name, p.default)
    return out


def loss_options(loss_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every loss option, `loss_cfg` (the config's `loss` entry or a dict) over the defaults;
    an unknown option is a one-line error naming it and the valid ones."""
    given = dict(loss_cfg.items())
    defaults = loss_defaults()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown loss option(s) {unknown} (config.loss); valid: {sorted(defaults)}")
    return {**defaults, **given}


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.batch_size = 64            # global batch (rows); every row is a negative for every other row
    c.total_steps = 100
    c.log_every = 10
    c.grad_cache_chunks = 0      # >1: gradient cache with this many chunks per global batch

    c.mesh = ConfigDict({"axes": ("data", "fsdp", "tensor"), "shape": (-1, 1, 1)})
    c.sharding = ConfigDict({"rules": (), "check_min_size": 1 << 22})

    c.model = model_config_dict("tiny")
    # A trained model to start from: a workdir, checkpoint step, param export,
    # or Hugging Face / sentence-transformers folder. Empty: random init.
    c.init_from = ""
    c.tokenizer = ConfigDict({"kind": "sentencepiece", "file": "debian_sp8k.model",
                              "max_length": 128, "add_bos": True, "add_eos": True})
    # Prompt templates of the model (method.md); empty strings mean raw text.
    c.prompts = ConfigDict({"query": "task: {task} | query: {text}",
                            "document": "title: {title} | text: {text}"})

    # The loss functions' keyword arguments, their defaults (embedder/losses.py and embedder/distill/losses.py document them):
    # matryoshka_nce's, and distill_* for distillation from a teacher (data.teacher names its
    # signals); loss.dims empty: the model's own model.mrl_dims.
    c.loss = ConfigDict(loss_defaults())

    c.optimizer = ConfigDict({
        "name": "adamw",
        "learning_rate": 1e-3,
        "warmup_steps": 10,
        "schedule": "cosine",       # cosine | linear | constant
        "end_lr_fraction": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "decay_norms_biases_embeddings": False,
        "grad_clip_norm": 1.0,
        "frozen": (),               # regexes of parameter paths to keep fixed
    })

    c.data = default_data_config()

    c.eval = ConfigDict({
        "tasks": (),                # task directories (BEIR / MTEB formats)
        "every_steps": 0,           # 0: only at the end
        "at_start": True,           # also evaluate the initial model
        "dims": (),                 # MRL dims to report; empty: the model's (model.mrl_dims)
        "batch_size": 128,
        "max_queries": 0,           # >0: subsample queries / texts during training evals
        "best_metric": "",          # e.g. "eval/DebianRetrieval/ndcg_at_10@64" (eval/<task name>/<metric>@<dim>); empty: last N only
    })

    c.checkpoint = ConfigDict({
        "every_steps": 50,
        "max_to_keep": 3,
        "async_save": True,
        "export_params": True,      # write DIR/export (param-only) at the end
    })
    return c


class ConfigError(ValueError):
    """A train config that cannot run; the message names the field and the fix."""


def check_config(config) -> None:
    """Rejects loop settings that cannot work, before any data is prepared or compiled."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    total = int(config.total_steps)
    need(total >= 1, f"config.total_steps={total} must be >= 1")
    need(int(config.batch_size) >= 1, f"config.batch_size={config.batch_size} must be >= 1")
    need(int(config.log_every) >= 1, f"config.log_every={config.log_every} must be >= 1 (1 logs every step)")
    need(int(config.checkpoint.every_steps) >= 1,
         f"config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1 "
         f"(a value >= total_steps saves only at the end)")
    need(int(config.eval.every_steps) >= 0,
         f"config.eval.every_steps={config.eval.every_steps} must be >= 0 (0: evaluate only at the end)")
    distilling = float(config.loss.get("distill_embedding_weight", 0.0)) > 0 or \
        float(config.loss.get("distill_score_weight", 0.0)) > 0
    teacher = str(config.data.get("teacher", "") or "")
    need(not distilling or teacher,
         "config.loss.distill_embedding_weight / distill_score_weight > 0 need the teacher's signals: set "
         "--config.data.teacher=SIGNALS (written by `python -m embedder.distill teacher`)")
    need(distilling or not teacher,
         f"config.data.teacher={teacher} is set but no distillation loss is on: set "
         "--config.loss.distill_embedding_weight and/or --config.loss.distill_score_weight > 0, or drop data.teacher")
    warmup = int(config.optimizer.warmup_steps)
    # An error rather than a silent clamp: a clamped warmup changes the schedule of every step.
    need(0 <= warmup <= total,
         f"config.optimizer.warmup_steps={warmup} is outside [0, total_steps={total}]; "
         f"set --config.optimizer.warmup_steps={min(max(warmup, 0), total)} or raise --config.total_steps")


def model_spec(config) -> dict:
    """The model spec (ARCHITECTURE.md) of the model this config trains."""
    tok = config.tokenizer.to_dict()
    prompts = config.prompts.to_dict()
    if not prompts.get("query") and not prompts.get("document"):
        prompts = None
    return {"model": config.model.to_dict(), "tokenizer": tok, "prompts": prompts}


def config_to_json(config) -> str:
    return json.dumps(config.to_dict(), indent=1, sort_keys=True, default=_json_default)


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return str(obj)
