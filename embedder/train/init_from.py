"""`config.init_from`: a run's first parameters from a saved model, with fresh heads where the
source has none (a pretrained LLM gains its projection), and the source's tokenizer on request."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil

import jax
import numpy as np

from embedder.checkpoint import CHECKPOINTS_DIR, CONFIG_FILE, flat_paths
from embedder.model.config import RUN_FIELDS, ModelConfig
from embedder.model_store import load_model, load_spec, locate_model

log = logging.getLogger("embedder.train")

# What a run may add on top of a source model: the projection head's parameters, and
# distillation's student -> teacher map (`model.heads.TEACHER_PROJECTION`).
FRESH_PREFIXES = ("head/", "teacher_projection/")
# Config fields whose difference the parameter shapes already show or that the run may change.
_SHAPE_OR_RUN_FIELDS = set(RUN_FIELDS) | {"projection_dims", "param_dtype"}


class InitFromError(ValueError):
    """`init_from` names a model whose parameters cannot start this run."""


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What `merge_params` did: paths initialised from the run's seed, and source paths left out."""

    fresh: tuple[str, ...]
    unused: tuple[str, ...]


def _fresh_allowed(path: str) -> bool:
    return path.startswith(FRESH_PREFIXES)


def check_source(source, fresh, *, source_name: str) -> InitReport:
    """Checks that a source params tree can start a run whose seeded params are `fresh` (leaves
    with `.shape`: arrays or `jax.ShapeDtypeStruct`s): the source may lack only head parameters
    (`FRESH_PREFIXES`), which start fresh, and may hold head parameters the run does not have,
    which are left out; every other difference, and any shape mismatch, is an `InitFromError`
    naming the first path, both shapes and the fix."""
    src, ours = flat_paths(source), flat_paths(fresh)
    missing = sorted(set(ours) - set(src))
    extra = sorted(set(src) - set(ours))
    fix = "set config.model to the architecture of that model (its model.json / config.json)"
    bad = [p for p in missing if not _fresh_allowed(p)]
    if bad:
        raise InitFromError(f"init_from={source_name} lacks parameter {bad[0]} of config.model ({len(bad)} such); "
                            f"only projection-head parameters can start fresh - {fix}")
    bad = [p for p in extra if not _fresh_allowed(p)]
    if bad:
        raise InitFromError(f"init_from={source_name} has parameter {bad[0]} that config.model lacks "
                            f"({len(bad)} such) - {fix}")
    for path, leaf in ours.items():
        if path in src and tuple(np.shape(src[path])) != tuple(leaf.shape):
            raise InitFromError(f"init_from={source_name}: parameter {path} has shape {tuple(np.shape(src[path]))} "
                                f"there but {tuple(leaf.shape)} in config.model - {fix}")
    return InitReport(tuple(missing), tuple(extra))


def merge_params(source: dict, fresh, *, source_name: str):
    """`fresh` (the run's seeded initialisation, on devices) with every parameter `source` has put
    in its place, after `check_source`; source values take the fresh leaf's dtype and sharding."""
    report = check_source(source, fresh, source_name=source_name)
    src = flat_paths(source)
    leaves = [jax.device_put(np.asarray(src[p]).astype(leaf.dtype), leaf.sharding) if p in src else leaf
              for p, leaf in flat_paths(fresh).items()]
    return jax.tree.unflatten(jax.tree.structure(fresh), leaves), report


def _config_differences(source_model: dict, model_config: ModelConfig) -> list[str]:
    ours = model_config.to_dict()
    return [f"{k}: {source_model[k]!r} -> {ours[k]!r}" for k in sorted(set(source_model) & set(ours))
            if k not in _SHAPE_OR_RUN_FIELDS and _plain(source_model[k]) != _plain(ours[k])]


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_init_params(path: str, fresh_params, model_config: ModelConfig):
    """The run's initial parameters: `path`'s (any saved model, HF folder or GGUF file) merged
    into `fresh_params` as `merge_params` says, in `model_config`'s layer layout; logs which
    paths start fresh and which source paths are not used."""
    try:
        params, spec = load_model(path, config=model_config)
    except (FileNotFoundError, ValueError) as e:   # no such model, or not a saved model
        raise InitFromError(f"init_from={path}: {e}; set --config.init_from to a saved model") from None
    merged, report = merge_params(params, fresh_params, source_name=path)
    for diff in _config_differences(spec.get("model") or {}, model_config):
        log.warning("init_from=%s: config.model differs from the source model in %s", path, diff)
    log.info("initialised parameters from %s (%d from the source)", path,
             len(flat_paths(params)) - len(report.unused))
    if report.fresh:
        log.info("init_from: %d parameter(s) newly initialised from the run's seed: %s", len(report.fresh),
                 ", ".join(report.fresh))
    if report.unused:
        log.info("init_from: %d source parameter(s) not used: %s", len(report.unused), ", ".join(report.unused))
    return merged, report


def saved_tokenizer(workdir: pathlib.Path, max_length: int) -> dict | None:
    """The tokenizer entry that an earlier start of the run in `workdir` took from its source
    (`source_tokenizer`), with `max_length` set to the run's: when the workdir holds a checkpoint
    step and its config.json names a tokenizer file present in the workdir; else None. A resumed
    run reads it instead of its `init_from` source, which it then never needs."""
    checkpoints = workdir / CHECKPOINTS_DIR
    if not checkpoints.is_dir() or not any(p.name.isdigit() for p in checkpoints.iterdir()):
        return None
    try:
        tok = dict(json.loads((workdir / CONFIG_FILE).read_text())["model_spec"]["tokenizer"] or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not tok.get("file") or not (workdir / tok["file"]).is_file():
        return None
    tok["max_length"] = int(max_length)
    return tok


def source_tokenizer(path: str, workdir: pathlib.Path, max_length: int) -> tuple[dict, pathlib.Path]:
    """`(entry, file)`: the tokenizer entry of `path`'s model spec with `max_length` set to the
    run's, naming its file by basename, and that file, copied into `workdir` (by process 0) so
    the workdir stays self-contained; `file` is the source's own copy, readable at once."""
    try:
        spec = load_spec(locate_model(path))
    except (FileNotFoundError, ValueError) as e:   # no such model, or not a saved model
        raise InitFromError(f"init_from={path}: {e}; set --config.init_from to a saved model") from None
    tok = dict(spec.get("tokenizer") or {})
    if not tok.get("file"):
        raise InitFromError(f"init_from={path} names no tokenizer file; set --config.tokenizer.file")
    source = pathlib.Path(tok["file"])
    if not source.is_file():
        raise InitFromError(f"init_from={path}: its tokenizer file {source} does not exist; set "
                            "--config.tokenizer.file")
    target = workdir / source.name
    if jax.process_index() == 0 and source.resolve() != target.resolve():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    tok.update(file=source.name, max_length=int(max_length))
    return tok, source
