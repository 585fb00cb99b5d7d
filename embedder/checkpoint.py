"""Orbax checkpoints: train-state checkpoints of a workdir, parameter-only exports,
and resolving any saved-model path to `(params, spec)`. The only module that imports Orbax.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

PARAMS_DIR = "params"
MODEL_SPEC_FILE = "model.json"
SOUP_FILE = "soup.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_corrupt"
TRAIN_ITEMS = ("state", "data", "config")
# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<n>" and renames it when complete.
_TMP_MARKER = ".orbax-checkpoint-tmp"


# ---------------------------------------------------------------- tree helpers

def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_paths(tree) -> dict[str, Any]:
    """Leaves of `tree` keyed by their '/'-joined path (dicts, lists and dataclasses alike)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat if leaf is not None}


def _unbox(params):
    # Flax logical-partitioning boxes carry metadata, not data; Orbax wants plain arrays.
    from flax.core import meta

    return meta.unbox(params)


def _to_json_value(value):
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return value


def _read_json(path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_to_json_value(value), f, indent=2, sort_keys=True)
        f.write("\n")
    tmp.replace(path)


def _tree_metadata(array_dir: pathlib.Path) -> dict:
    """Shapes/dtypes of an Orbax PyTree directory, as the nested tree Orbax saved."""
    meta = ocp.PyTreeCheckpointHandler().metadata(array_dir)
    return meta.tree if hasattr(meta, "tree") else meta


def _restore_tree(array_dir: pathlib.Path, metadata_tree, shardings=None, subtree=None):
    """Restores `metadata_tree` (or its `subtree` key) from an Orbax PyTree directory.

    Without shardings the leaves come back as host numpy arrays, so a checkpoint
    written on any topology loads anywhere. With shardings (a tree matching the
    params, or one Sharding for every leaf) they are restored straight onto them.
    """
    target = metadata_tree[subtree] if subtree else metadata_tree
    if shardings is None:
        item = jax.tree.map(lambda m: np.zeros((0,), m.dtype), target)
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda _: shardings, target)
        _check_same_tree(target, shardings, "checkpoint", "shardings")
        item = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), target, shardings)
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    if subtree:
        item, restore_args = {subtree: item}, {subtree: restore_args}
    restored = ocp.PyTreeCheckpointHandler().restore(
        array_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=bool(subtree))
    )
    return restored[subtree] if subtree else restored


def _check_same_tree(a, b, a_name: str, b_name: str) -> None:
    """Raises naming the first differing path when `a` and `b` differ in paths or leaf shapes."""
    fa, fb = flat_paths(a), flat_paths(b)
    if set(fa) != set(fb):
        only_a = sorted(k for k in fa if k not in fb)
        only_b = sorted(k for k in fb if k not in fa)
        raise ValueError(
            f"tree structures differ between {a_name} and {b_name}: "
            f"only in {a_name}: {only_a[:5]}, only in {b_name}: {only_b[:5]}"
        )
    for k in sorted(fa):
        sa, sb = getattr(fa[k], "shape", None), getattr(fb[k], "shape", None)
        if sa is not None and sb is not None and tuple(sa) != tuple(sb):
            raise ValueError(f"shape of {k!r} differs: {tuple(sa)} in {a_name}, {tuple(sb)} in {b_name}")


# ---------------------------------------------------------------- param exports

def save_params(directory, params, spec: dict, tokenizer_file=None, *, overwrite: bool = False,
                extra_files: dict | None = None) -> pathlib.Path:
    """Writes a parameter export: `params/` (Orbax), `model.json` (the spec) and the tokenizer.

    The tokenizer (`tokenizer_file`, else the spec's file when it exists) is
    copied next to `model.json` and the spec is rewritten to name it by basename.
    `extra_files` maps file names to JSON values written alongside (e.g. soup.json).
    `model.json` is written last: its presence marks a complete export.
    """
    directory = pathlib.Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() or (directory / MODEL_SPEC_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already holds a parameter export; pass overwrite=True "
                                  "or choose another directory")
        if jax.process_index() == 0:
            shutil.rmtree(directory / PARAMS_DIR, ignore_errors=True)
            (directory / MODEL_SPEC_FILE).unlink(missing_ok=True)
        ocp.multihost.sync_global_processes("embedder_save_params_clear")
    if not isinstance(spec, dict) or "model" not in spec:
        raise ValueError(f"spec must be a model-spec dict with a 'model' entry, got {type(spec).__name__} "
                         f"with keys {sorted(spec) if isinstance(spec, dict) else '-'}")
    spec = copy.deepcopy(spec)
    tok = spec.get("tokenizer") or {}
    source = pathlib.Path(tokenizer_file) if tokenizer_file else None
    if source is None and tok.get("file") and pathlib.Path(tok["file"]).is_file():
        source = pathlib.Path(tok["file"])
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"tokenizer file {source} does not exist")
    directory.mkdir(parents=True, exist_ok=True)
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        directory / PARAMS_DIR, args=ocp.args.StandardSave(_unbox(params)))
    if jax.process_index() == 0:
        if source is not None:
            if source.resolve() != (directory / source.name).resolve():
                shutil.copyfile(source, directory / source.name)
            spec.setdefault("tokenizer", {})["file"] = source.name
        for name, value in (extra_files or {}).items():
            _write_json(directory / name, value)
        _write_json(directory / MODEL_SPEC_FILE, spec)
    ocp.multihost.sync_global_processes("embedder_save_params_done")
    return directory


def _absolute_tokenizer(spec: dict, base: pathlib.Path) -> dict:
    # Callers pass the spec on (load_tokenizer, save_params) without knowing where it came from.
    tok = spec.get("tokenizer") or {}
    name = tok.get("file")
    if name and not pathlib.Path(name).is_absolute() and (base / name).exists():
        spec = copy.deepcopy(spec)
        spec["tokenizer"]["file"] = str((base / name).resolve())
    return spec


def load_params(directory, shardings=None):
    """Loads a parameter export -> `(params, spec)`; numpy leaves, or jax arrays on `shardings`.

    The spec's tokenizer file is made absolute when it lies in the export.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"parameter export {directory} does not exist")
    missing = [n for n in (PARAMS_DIR, MODEL_SPEC_FILE) if not (directory / n).exists()]
    if missing:
        raise ValueError(f"{directory} is not a parameter export: missing {', '.join(missing)} "
                         "(an export is written by embedder.checkpoint.save_params / export_params)")
    spec = _read_json(directory / MODEL_SPEC_FILE)
    params = _restore_tree(directory / PARAMS_DIR, _tree_metadata(directory / PARAMS_DIR), shardings)
    return params, _absolute_tokenizer(spec, directory.absolute())


def param_metadata(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{param path: (shape, dtype)}` of any saved model, without reading the arrays."""
    loc = locate_model(path)
    array_dir, subtree = loc.array_dir()
    tree = _tree_metadata(array_dir)
    tree = tree[subtree] if subtree else tree
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flat_paths(tree).items()}


# ---------------------------------------------------------------- step validity

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


# ---------------------------------------------------------------- train checkpoints

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


# ---------------------------------------------------------------- resolving saved models

@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where a saved model's parameters live: a param export (soups too) or a train step."""

    kind: str  # "export" | "step"
    directory: pathlib.Path  # the export dir, or the step dir
    workdir: pathlib.Path | None = None
    step: int | None = None

    def array_dir(self) -> tuple[pathlib.Path, str | None]:
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
    """Finds the parameters behind `path`: a param export or soup, a workdir, or a step dir.

    A workdir gives its newest complete step, or with `best_metric` its best step by
    that metric (`best_mode` "max"/"min"), among complete steps.
    """
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
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
                     f"({PARAMS_DIR}/ + {MODEL_SPEC_FILE}), a workdir ({CHECKPOINTS_DIR}/<step>/) "
                     f"or a checkpoint step directory ({CHECKPOINTS_DIR}/<step>)")


def load_spec(loc: ModelLocation) -> dict:
    """The model spec of a located model (model.json, else the step's or workdir's train config)."""
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
    """`(params, spec)` of a located model."""
    spec = load_spec(loc)
    array_dir, subtree = loc.array_dir()
    params = _restore_tree(array_dir, _tree_metadata(array_dir), shardings, subtree=subtree)
    return params, spec


def resolve_model_path(path, *, best_metric: str | None = None, best_mode: str = "max", shardings=None):
    """`(params, spec)` of a workdir (newest or best step), step dir, param export or soup."""
    return load_located(locate_model(path, best_metric=best_metric, best_mode=best_mode), shardings)


def export_params(workdir_or_step, out_dir, *, best_metric: str | None = None, best_mode: str = "max",
                  overwrite: bool = False) -> pathlib.Path:
    """Writes a parameter-only export of a train checkpoint (or re-exports any saved model)."""
    params, spec = resolve_model_path(workdir_or_step, best_metric=best_metric, best_mode=best_mode)
    tok = (spec.get("tokenizer") or {}).get("file")
    tokenizer_file = tok if tok and pathlib.Path(tok).is_file() else None
    return save_params(out_dir, params, spec, tokenizer_file=tokenizer_file, overwrite=overwrite)
