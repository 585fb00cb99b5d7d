"""Per-block rematerialisation (activation checkpointing) from the config's policy name."""

from __future__ import annotations

import flax.linen as nn
import jax


def remat_block(block_cls, policy: str, *, prevent_cse: bool = True):
    """Wraps a block class with `nn.remat`; blocks are called as
    `block(x, key_mask, deterministic, ...)` and `deterministic` must stay static.

    Inside `nn.scan` pass `prevent_cse=False`: the loop already keeps XLA from merging the
    recomputation with the forward pass, and the extra barriers only cost performance."""
    if policy == "none":
        return block_cls
    if policy == "full":
        saveable = None  # save nothing, recompute the whole block in the backward pass
    elif policy == "dots_saveable":
        saveable = jax.checkpoint_policies.dots_saveable
    else:
        raise ValueError(f"unknown remat policy {policy!r}; use none, full or dots_saveable")
    # static_argnums counts self as 0: x=1, key_mask=2, deterministic=3.
    return nn.remat(block_cls, policy=saveable, prevent_cse=prevent_cse, static_argnums=(3,))
