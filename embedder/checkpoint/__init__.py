"""Orbax checkpoints: train-state checkpoints of a workdir and parameter-only exports. The only
package that imports Orbax; loading any saved model by path is `embedder.model_store`, which reads
through the functions of `embedder.checkpoint.saved` and `.steps` exported here."""
from embedder.checkpoint.exports import save_params
from embedder.checkpoint.manager import TrainCheckpointer
from embedder.checkpoint.saved import export_spec, params_metadata, read_params, recorded_metrics, train_spec, usable_steps
from embedder.checkpoint.steps import best_step, step_problem
from embedder.checkpoint.trees import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_SPEC_FILE, PARAMS_DIR, QUARANTINE_DIR,
                                       SOUP_FILE, TRAIN_ITEMS, flat_paths)

__all__ = [
    "CHECKPOINTS_DIR", "CONFIG_FILE", "MODEL_SPEC_FILE", "PARAMS_DIR", "QUARANTINE_DIR", "SOUP_FILE", "TRAIN_ITEMS",
    "TrainCheckpointer", "best_step", "export_spec", "flat_paths", "params_metadata", "read_params",
    "recorded_metrics", "save_params", "step_problem", "train_spec", "usable_steps",
]
