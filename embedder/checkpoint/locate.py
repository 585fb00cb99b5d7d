"""Resolving any saved-model path (workdir, step dir, export, soup, or a Hugging Face /
sentence-transformers folder, converted in memory) to `(params, spec)`."""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np

from embedder.checkpoint.exports import _absolute_tokenizer, save_params
from embedder.checkpoint.train_state import _best_step, _step_dirs, _step_metrics, _step_problem
from embedder.checkpoint.trees import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_SPEC_FILE, PARAMS_DIR, _read_json,
                                        _restore_tree, _tree_metadata, flat_paths)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where a saved model's parameters live: a param export (soups too), a train step, or a
    Hugging Face / sentence-transformers folder (read through `embedder.convert.from_hf`)."""

    kind: str  # "export" | "step" | "hf"
    directory: pathlib.Path  # the export dir, the step dir, or the HF folder
    workdir: pathlib.Path | None = None
    step: int | None = None

    def array_dir(self) -> tuple[pathlib.Path, str | None]:
        """The Orbax array directory and the subtree holding the params (exports and steps)."""
        if self.kind == "hf":
            raise ValueError(f"{self.directory} is a Hugging Face folder: its tensors are safetensors, "
                             "not Orbax arrays (read it with load_located)")
        if self.kind == "export":
            return self.directory / PARAMS_DIR, None
        return self.directory / "state", "params"

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": str(self.directory)}
        if self.step is not None:
            out["step"] = self.step
        return out


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and (path / "state").exists()


def locate_model(path, *, best_metric: str | None = None, best_mode: str = "max") -> ModelLocation:
    """Finds the parameters behind `path`: a param export or soup, a workdir, a step dir, or a
    Hugging Face / sentence-transformers folder (without a model.json of ours).

    A workdir gives its newest complete step, or with `best_metric` its best step by
    that metric (`best_mode` "max"/"min"), among complete steps.
    """
    from embedder.convert.from_hf import is_hf_folder

    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if is_hf_folder(path) and not (path / MODEL_SPEC_FILE).is_file():
        return ModelLocation("hf", path)
    if (path / MODEL_SPEC_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return ModelLocation("export", path)
    if _is_step_dir(path):
        problem = _step_problem(path)
        if problem:
            raise ValueError(f"checkpoint step {path} is unusable: {problem}")
        return ModelLocation("step", path, workdir=path.parent.parent, step=int(path.name))
    if (path / CHECKPOINTS_DIR).is_dir():
        steps = _step_dirs(path / CHECKPOINTS_DIR)
        good = {}
        for s, d in sorted(steps.items()):
            problem = _step_problem(d)
            if problem:
                log.warning("skipping checkpoint step %d of %s: %s", s, path, problem)
            else:
                good[s] = d
        if not good:
            raise FileNotFoundError(f"workdir {path} holds no complete checkpoint in {path / CHECKPOINTS_DIR}")
        step = max(good)
        if best_metric:
            step = _best_step(good, best_metric, best_mode)
            if step is None:
                raise ValueError(f"no checkpoint of {path} recorded metric {best_metric!r}; "
                                 f"known metrics: {sorted({k for d in good.values() for k in (_step_metrics(d) or {})})}")
        return ModelLocation("step", good[step], workdir=path, step=step)
    hint = ""
    if (path / MODEL_SPEC_FILE).exists() or (path / CONFIG_FILE).exists():
        hint = " (it has a spec/config but no parameters: an unfinished export or a run that never saved)"
    raise ValueError(f"{path} is not a saved model{hint}: expected a parameter export "
                     f"({PARAMS_DIR}/ + {MODEL_SPEC_FILE}), a workdir ({CHECKPOINTS_DIR}/<step>/), "
                     f"a checkpoint step directory ({CHECKPOINTS_DIR}/<step>) or a Hugging Face / "
                     "sentence-transformers folder (config.json with a model_type, or modules.json)")


def _read_hf(loc: ModelLocation, *, shapes_only: bool = False):
    from embedder.convert.from_hf import read_hf_folder

    return read_hf_folder(loc.directory, shapes_only=shapes_only)


def load_spec(loc: ModelLocation) -> dict:
    """The model spec of a located model (model.json, else the step's or workdir's train config;
    an HF folder's is converted from its config files)."""
    if loc.kind == "hf":
        return _read_hf(loc, shapes_only=True).spec
    if loc.kind == "export":
        return _absolute_tokenizer(_read_json(loc.directory / MODEL_SPEC_FILE), loc.directory)
    candidates = [loc.directory / "config" / "metadata", loc.workdir / CONFIG_FILE]
    for candidate in candidates:
        try:
            config = _read_json(candidate)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(config, dict) and isinstance(config.get("model_spec"), dict):
            return _absolute_tokenizer(config["model_spec"], loc.workdir)
    raise ValueError(f"no model spec for {loc.directory}: neither {candidates[0]} nor {candidates[1]} "
                     "has a 'model_spec' entry (the train loop writes it into config.json)")


def load_located(loc: ModelLocation, shardings=None):
    """`(params, spec)` of a located model; with `shardings` (a matching tree) the params are
    placed on devices, else they come back as host numpy arrays."""
    if loc.kind == "hf":
        hf = _read_hf(loc)
        return (hf.params if shardings is None else jax.device_put(hf.params, shardings)), hf.spec
    spec = load_spec(loc)
    array_dir, subtree = loc.array_dir()
    params = _restore_tree(array_dir, _tree_metadata(array_dir), shardings, subtree=subtree)
    return params, spec


def resolve_model_path(path, *, best_metric: str | None = None, best_mode: str = "max", shardings=None):
    """`(params, spec)` of a workdir (newest or best step), step dir, param export or soup, or
    a Hugging Face / sentence-transformers folder (converted in memory)."""
    return load_located(locate_model(path, best_metric=best_metric, best_mode=best_mode), shardings)


def export_params(workdir_or_step, out_dir, *, best_metric: str | None = None, best_mode: str = "max",
                  overwrite: bool = False) -> pathlib.Path:
    """Writes a parameter-only export of a train checkpoint (or re-exports any saved model)."""
    params, spec = resolve_model_path(workdir_or_step, best_metric=best_metric, best_mode=best_mode)
    tok = (spec.get("tokenizer") or {}).get("file")
    tokenizer_file = tok if tok and pathlib.Path(tok).is_file() else None
    return save_params(out_dir, params, spec, tokenizer_file=tokenizer_file, overwrite=overwrite)


def param_tree_metadata(path_or_location):
    """The params tree of a saved model with metadata leaves (`.shape`, `.dtype`), no arrays read."""
    loc = path_or_location if isinstance(path_or_location, ModelLocation) else locate_model(path_or_location)
    if loc.kind == "hf":
        return _read_hf(loc, shapes_only=True).params
    array_dir, subtree = loc.array_dir()
    tree = _tree_metadata(array_dir)
    return tree[subtree] if subtree else tree


def param_metadata(path_or_location) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{param path: (shape, dtype)}` of a saved model, without reading the arrays."""
    tree = param_tree_metadata(path_or_location)
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flat_paths(tree).items()}
