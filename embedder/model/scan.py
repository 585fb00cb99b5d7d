"""`nn.scan` over one encoder block (`scan_layers`): params stacked on a leading "layers" axis,
so XLA compiles one layer body instead of `num_layers` unrolled copies (as MaxText does)."""

from __future__ import annotations

import flax.linen as nn

from embedder.model.config import ModelConfig
from embedder.model.remat import remat_block

# The stacked subtree: params live at `encoder/layers/...` with shape [num_layers, ...].
STACK_NAME = "layers"
# Logical name of the stacked axis; the sharding rules map it to None (every device holds
# all layers of its shard), which keeps each step of the loop free of collectives over it.
LAYER_AXIS = "layers"


def scanned_block(block_cls, cfg: ModelConfig, *, per_layer_inputs: int = 0):
    """`block_cls` remat-wrapped per `cfg.remat` and scanned over `cfg.num_layers` layers.

    The block must be built with `scan_step=True` (it then returns `(x, None)`) and is called
    as `(x, key_mask, deterministic, *per_layer)`: `key_mask` and the static `deterministic`
    are broadcast to every layer, each of the `per_layer_inputs` trailing arrays is sliced
    along its leading `[num_layers]` axis. Returns a module class (build it with
    `name=STACK_NAME`)."""
    block = remat_block(block_cls, cfg.remat, prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast) + (0,) * per_layer_inputs,
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: LAYER_AXIS},
    )
