"""The one model store: any saved model - workdir, checkpoint step, export, soup, Hugging Face /
sentence-transformers folder, GGUF file - located and read as `(params, spec)`, in the layer
layout a config asks for. `init_from`, `Embedder.load`, soups and `convert` all load here.
A train step's params come without what only training uses (distillation's teacher projection)."""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np

from embedder.checkpoint import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_SPEC_FILE, PARAMS_DIR, best_step, export_spec,
                                 flat_paths, params_metadata, read_params, recorded_metrics, save_params,
                                 step_problem, train_spec, usable_steps)
from embedder.convert.from_gguf import is_gguf_file, read_gguf
from embedder.convert.from_hf import is_hf_folder, read_hf_folder
from embedder.model.config import ModelConfig
from embedder.model.heads import TEACHER_PROJECTION, model_params
from embedder.model.layer_stack import match_layer_layout
from embedder.model.quant import dequantize_params, from_stored, logical_metadata

# A quantised parameter export's spec entry (`python -m embedder.quantize`): scheme, block and the
# plan of every quantised leaf. The store loads such an export as the float model it encodes.
QUANTIZATION_KEY = "quantization"


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where a saved model's parameters live: a param export (soups too), a train step, a
    Hugging Face / sentence-transformers folder (`embedder.convert.from_hf`) or a GGUF file
    (`embedder.convert.from_gguf`); the last two are converted in memory."""

    kind: str  # "export" | "step" | "hf" | "gguf"
    directory: pathlib.Path  # the export dir, the step dir, the HF folder, or the GGUF file
    workdir: pathlib.Path | None = None
    step: int | None = None

    def array_dir(self) -> tuple[pathlib.Path, str | None]:
        """The Orbax array directory and the subtree holding the params (exports and steps)."""
        if self.converted:
            raise ValueError(f"{self.directory} is a {self.kind} model: its tensors are not Orbax arrays "
                             "(read it with load_located)")
        if self.kind == "export":
            return self.directory / PARAMS_DIR, None
        return self.directory / "state", "params"

    @property
    def converted(self) -> bool:
        """Read through a converter (HF folder, GGUF file) rather than from Orbax arrays."""
        return self.kind in ("hf", "gguf")

    def describe(self) -> dict:
        out = {"kind": self.kind, "path": str(self.directory)}
        if self.step is not None:
            out["step"] = self.step
        return out


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and (path / "state").exists()


def locate_model(path, *, best_metric: str | None = None, best_mode: str = "max") -> ModelLocation:
    """Finds the parameters behind `path`: a param export or soup, a workdir, a step dir, a
    Hugging Face / sentence-transformers folder (without a model.json of ours), or a GGUF file.

    A workdir gives its newest complete step, or with `best_metric` its best step by
    that metric (`best_mode` "max"/"min"), among complete steps.
    """
    path = pathlib.Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if is_gguf_file(path):
            return ModelLocation("gguf", path)
        raise ValueError(f"{path} is a file but not a GGUF model; a saved model is a GGUF file or a directory "
                         "(workdir, checkpoint step, parameter export, soup, Hugging Face folder)")
    if is_hf_folder(path) and not (path / MODEL_SPEC_FILE).is_file():
        return ModelLocation("hf", path)
    if (path / MODEL_SPEC_FILE).is_file() and (path / PARAMS_DIR).is_dir():
        return ModelLocation("export", path)
    if _is_step_dir(path):
        problem = step_problem(path)
        if problem:
            raise ValueError(f"checkpoint step {path} is unusable: {problem}")
        return ModelLocation("step", path, workdir=path.parent.parent, step=int(path.name))
    if (path / CHECKPOINTS_DIR).is_dir():
        good = usable_steps(path / CHECKPOINTS_DIR)
        if not good:
            raise FileNotFoundError(f"workdir {path} holds no complete checkpoint in {path / CHECKPOINTS_DIR}")
        step = max(good)
        if best_metric:
            step = best_step(good, best_metric, best_mode)
            if step is None:
                raise ValueError(f"no checkpoint of {path} recorded metric {best_metric!r}; "
                                 f"known metrics: {recorded_metrics(good)}")
        return ModelLocation("step", good[step], workdir=path, step=step)
    hint = ""
    if (path / MODEL_SPEC_FILE).exists() or (path / CONFIG_FILE).exists():
        hint = " (it has a spec/config but no parameters: an unfinished export or a run that never saved)"
    raise ValueError(f"{path} is not a saved model{hint}: expected a parameter export "
                     f"({PARAMS_DIR}/ + {MODEL_SPEC_FILE}), a workdir ({CHECKPOINTS_DIR}/<step>/), "
                     f"a checkpoint step directory ({CHECKPOINTS_DIR}/<step>), a Hugging Face / "
                     "sentence-transformers folder (config.json with a model_type, or modules.json) "
                     "or a GGUF file")


def _read_converted(loc: ModelLocation, *, shapes_only: bool = False):
    read = read_gguf if loc.kind == "gguf" else read_hf_folder
    return read(loc.directory, shapes_only=shapes_only)


def load_spec(loc: ModelLocation) -> dict:
    """The model spec of a located model (model.json, else the step's or workdir's train config;
    an HF folder's or GGUF file's is converted from its config / metadata)."""
    if loc.converted:
        return _read_converted(loc, shapes_only=True).spec
    if loc.kind == "export":
        spec = export_spec(loc.directory)
        return {k: v for k, v in spec.items() if k != QUANTIZATION_KEY}
    return train_spec(loc.directory, loc.workdir)


def quantization_of(loc: ModelLocation) -> dict | None:
    """The quantisation entry of a quantised export (scheme, block, per-leaf plan), else None."""
    return export_spec(loc.directory).get(QUANTIZATION_KEY) if loc.kind == "export" else None


def _dequantized_dtype(spec: dict):
    return np.dtype((spec.get("model") or {}).get("param_dtype", "float32"))


def load_located(loc: ModelLocation, shardings=None):
    """`(params, spec)` of a located model; with `shardings` (a matching tree) the params are
    placed on devices, else they come back as host numpy arrays."""
    if loc.converted:
        model = _read_converted(loc)
        return (model.params if shardings is None else jax.device_put(model.params, shardings)), model.spec
    spec = load_spec(loc)
    array_dir, subtree = loc.array_dir()
    quantization = quantization_of(loc)
    if quantization is not None:  # integers and scales on disk, dequantised to the param dtype here
        table = quantization["leaves"]
        params = dequantize_params(from_stored(read_params(array_dir), table), table, _dequantized_dtype(spec))
        return (params if shardings is None else jax.device_put(params, shardings)), spec
    return read_params(array_dir, subtree, shardings, leave_out=(TEACHER_PROJECTION,)), spec


def load_model(path, *, config: ModelConfig | None = None, best_metric: str | None = None,
               best_mode: str = "max", shardings=None):
    """`(params, spec)` of a workdir (newest or best step), step dir, param export or soup, a
    Hugging Face / sentence-transformers folder or a GGUF file (converted in memory).

    With `config` the params come in the layer layout it asks for (`scan_layers`): stacked or
    unrolled whatever layout they were saved in. `shardings` (a tree matching the saved params'
    layout) places them on devices; else they are host arrays."""
    params, spec = load_located(locate_model(path, best_metric=best_metric, best_mode=best_mode), shardings)
    if config is not None:
        params = match_layer_layout(params, config)
    return params, spec


def export_params(workdir_or_step, out_dir, *, best_metric: str | None = None, best_mode: str = "max",
                  overwrite: bool = False) -> pathlib.Path:
    """Writes a parameter-only export of a train checkpoint (or re-exports any saved model)."""
    params, spec = load_model(workdir_or_step, best_metric=best_metric, best_mode=best_mode)
    tok = (spec.get("tokenizer") or {}).get("file")
    tokenizer_file = tok if tok and pathlib.Path(tok).is_file() else None
    return save_params(out_dir, params, spec, tokenizer_file=tokenizer_file, overwrite=overwrite)


def param_tree_metadata(path_or_location):
    """The params tree of a saved model with metadata leaves (`.shape`, `.dtype`), no arrays read."""
    loc = path_or_location if isinstance(path_or_location, ModelLocation) else locate_model(path_or_location)
    if loc.converted:
        return _read_converted(loc, shapes_only=True).params
    quantization = quantization_of(loc)
    if quantization is not None:
        return logical_metadata(params_metadata(*loc.array_dir()), quantization["leaves"],
                                _dequantized_dtype(load_spec(loc)))
    return model_params(params_metadata(*loc.array_dir()))


def param_metadata(path_or_location) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{param path: (shape, dtype)}` of a saved model, without reading the arrays."""
    tree = param_tree_metadata(path_or_location)
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flat_paths(tree).items()}
