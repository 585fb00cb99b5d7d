"""Per-block rematerialisation (activation checkpointing) from the config's policy name."""

from __future__ import annotations

import flax.linen as nn
import jax


def remat_block(block_cls, policy: str):
    """Wraps a block class with `nn.remat`; blocks are called as
    `block(x, key_mask, deterministic)` and `deterministic` must stay static."""
    if policy == "none":
        return block_cls
    if policy == "full":
        saveable = None  # save nothing, recompute the whole block in the backward pass
    elif policy == "dots_saveable":
        saveable = jax.checkpoint_policies.dots_saveable
    else:
        raise ValueError(f"unknown remat policy {policy!r}; use none, full or dots_saveable")
    return nn.remat(block_cls, policy=saveable, prevent_cse=True, static_argnums=(3,))  # self=0, x, key_mask, deterministic
