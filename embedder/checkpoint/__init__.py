"""Orbax checkpoints: train-state checkpoints of a workdir and parameter-only exports. The only
package that imports Orbax; loading any saved model by path is `embedder.model_store`."""
from embedder.checkpoint.exports import load_params, save_params
from embedder.checkpoint.manager import TrainCheckpointer
from embedder.checkpoint.trees import (CHECKPOINTS_DIR, CONFIG_FILE, MODEL_SPEC_FILE, PARAMS_DIR, QUARANTINE_DIR,
                                       SOUP_FILE, TRAIN_ITEMS, flat_paths)

__all__ = [
    "CHECKPOINTS_DIR", "CONFIG_FILE", "MODEL_SPEC_FILE", "PARAMS_DIR", "QUARANTINE_DIR", "SOUP_FILE", "TRAIN_ITEMS",
    "TrainCheckpointer", "flat_paths", "load_params", "save_params",
]
