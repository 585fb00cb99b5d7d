"""Parameter exports: `params/` (Orbax) + `model.json` (the model spec) + the tokenizer file. They are
read back through `embedder.model_store.load_model`, like every saved model."""
from __future__ import annotations

import copy
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from embedder.checkpoint.trees import MODEL_SPEC_FILE, PARAMS_DIR, _unbox, write_json


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
            write_json(directory / name, value)
        write_json(directory / MODEL_SPEC_FILE, spec)
    ocp.multihost.sync_global_processes("embedder_save_params_done")
    return directory


def absolute_tokenizer(spec: dict, base: pathlib.Path) -> dict:
    """`spec` with its tokenizer file made absolute when it lies in `base`: callers pass the spec on
    (load_tokenizer, save_params) without knowing where it came from."""
    tok = spec.get("tokenizer") or {}
    name = tok.get("file")
    if name and not pathlib.Path(name).is_absolute() and (base / name).exists():
        spec = copy.deepcopy(spec)
        spec["tokenizer"]["file"] = str((base / name).resolve())
    return spec
