"""Orbax checkpoints: train-state checkpoints of a workdir, parameter-only exports,
and resolving any saved-model path (HF folders too, via `embedder.convert.from_hf`) to
`(params, spec)`. The only package that imports Orbax.
"""
from embedder.checkpoint.exports import load_params, save_params
from embedder.checkpoint.locate import (ModelLocation, export_params, load_located, load_spec, locate_model,
                                        param_metadata, param_tree_metadata, resolve_model_path)
from embedder.checkpoint.train_state import TrainCheckpointer
from embedder.checkpoint.trees import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_SPEC_FILE, PARAMS_DIR, QUARANTINE_DIR,
                                       SOUP_FILE, TRAIN_ITEMS, flat_paths)

__all__ = [
    "CHECKPOINTS_DIR", "CONFIG_FILE", "MODEL_SPEC_FILE", "PARAMS_DIR", "QUARANTINE_DIR", "SOUP_FILE", "TRAIN_ITEMS",
    "ModelLocation", "TrainCheckpointer", "export_params", "flat_paths", "load_located", "load_params", "load_spec",
    "locate_model", "param_metadata", "param_tree_metadata", "resolve_model_path", "save_params",
]
