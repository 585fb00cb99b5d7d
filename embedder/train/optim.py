"""The optimizer from the train config: AdamW, warmup + decay, clipping, decay and freeze masks."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

# Parameters that get no weight decay unless `decay_norms_biases_embeddings`:
# norm scales/biases, linear biases (`b`, `bias`) and embedding tables, by the
# names the model families use (`.../final_norm/scale`, `.../q/b`,
# `encoder/word_embedding`, ...).
NO_DECAY_PATTERN = r"(^|/)(b|bias|scale)$|norm|embedding$"

SCHEDULES = ("cosine", "linear", "constant")


def param_path(key_path) -> str:
    """`'encoder/layer_0/attention/q/w'` for a params-tree key path."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _get(cfg, name, default):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine / linear decay to
    `end_lr_fraction * learning_rate` at `total_steps`, or constant."""
    lr = float(_get(opt_cfg, "learning_rate", 1e-3))
    warmup = int(_get(opt_cfg, "warmup_steps", 0))
    kind = str(_get(opt_cfg, "schedule", "cosine"))
    end = lr * float(_get(opt_cfg, "end_lr_fraction", 0.0))
    if lr <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {lr}")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r} is not one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 for the learning-rate schedule, got {total_steps}")
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"optimizer.warmup_steps={warmup} must be in [0, total_steps={total_steps}]")
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_labels(params, fn: Callable[[str], Any]):
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(param_path(path)), params)


def weight_decay_mask(params, decay_everything: bool = False):
    """Bool tree: True where weight decay applies."""
    if decay_everything:
        return jax.tree.map(lambda _: True, params)
    pattern = re.compile(NO_DECAY_PATTERN)
    return _path_labels(params, lambda p: pattern.search(p) is None)


def frozen_labels(params, patterns: Sequence[str]):
    """`'frozen'` / `'train'` per parameter; every pattern must match at least one path."""
    compiled = []
    for pat in patterns:
        try:
            compiled.append(re.compile(pat))
        except re.error as e:
            raise ValueError(f"optimizer.frozen pattern {pat!r} is not a valid regex: {e}") from e
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pat, rx in zip(patterns, compiled):
        # An empty tree comes from optax's structure probes (tree_map_params): nothing to check.
        if paths and not any(rx.search(p) for p in paths):
            raise ValueError(f"optimizer.frozen pattern {pat!r} matches no parameter; paths look like "
                             f"{paths[:3]} (regex search on '/'-joined paths)")
    return _path_labels(params, lambda p: "frozen" if any(rx.search(p) for rx in compiled) else "train")


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the config's schedule, global-norm clipping, decay mask and frozen subtrees.

    `opt_cfg` fields (train config `optimizer`): name ('adamw'), learning_rate, warmup_steps,
    schedule, end_lr_fraction, b1, b2, eps, weight_decay, decay_norms_biases_embeddings,
    grad_clip_norm (<= 0: off), frozen (regexes of parameter paths that never change).
    Clipping sees only the trainable parameters' gradients.
    """
    name = str(_get(opt_cfg, "name", "adamw"))
    if name != "adamw":
        raise ValueError(f"optimizer.name={name!r} is not supported; use 'adamw'")
    schedule = make_schedule(opt_cfg, total_steps)
    decay_all = bool(_get(opt_cfg, "decay_norms_biases_embeddings", False))
    parts = []
    clip = float(_get(opt_cfg, "grad_clip_norm", 0.0))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(
        schedule, b1=float(_get(opt_cfg, "b1", 0.9)), b2=float(_get(opt_cfg, "b2", 0.999)),
        eps=float(_get(opt_cfg, "eps", 1e-8)), weight_decay=float(_get(opt_cfg, "weight_decay", 0.0)),
        mask=lambda params: weight_decay_mask(params, decay_all)))
    tx = optax.chain(*parts)
    frozen = tuple(_get(opt_cfg, "frozen", ()))
    if not frozen:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda params: frozen_labels(params, frozen))
