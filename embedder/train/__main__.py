"""`python -m embedder.train --config experiments/NAME.py[:ARG] --workdir DIR [--config.x=v ...]`.

Trains (or resumes) the experiment in DIR. With `--compile_only` it builds the
mesh, ahead-of-time compiles the train step and reports its memory instead.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, `path.py` or `path.py:ARG`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, metrics, eval.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "AOT-compile the train step, print its memory use and FLOPs, and exit.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "With --compile_only: a TPU topology such as v5e:4x4 or v5p:4x4x4 (needs the tpu extra).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: number of slices.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host; launch/ scripts set this).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/demo.py:prefinetune")
    if _COMPILE_ONLY.value:
        from embedder.train.compile_only import compile_only

        sys.exit(compile_only(_CONFIG.value, topology=_TOPOLOGY.value, num_slices=_NUM_SLICES.value))
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize()
    from embedder.train.loop import train

    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
