"""BERT-style encoder (MiniLM, BGE, E5): learned positions, token types, post-LayerNorm, GELU."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from embedder.model.attention import Attention, PackedMask
from embedder.model.config import ModelConfig
from embedder.model.feedforward import FeedForward
from embedder.model.norms import LayerNorm
from embedder.model.quant import lookup_rows
from embedder.model.remat import remat_block
from embedder.model.scan import STACK_NAME, scanned_block

_EMBED_INIT = nn.initializers.normal(stddev=0.02)


class BertBlock(nn.Module):
    """Attention and MLP, each followed by dropout, residual add and LayerNorm.

    `scan_step=True` makes it an `nn.scan` body that returns `(x, None)`."""

    config: ModelConfig
    scan_step: bool = False

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool):
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        shape = x.shape
        h = Attention(cfg, "global", name="attention")(x, key_mask, deterministic)
        # The residual stream runs over token rows [B * L, D]: the norms' and biases'
        # gradients are then one-axis sums (see FeedForward).
        x, h = x.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic or cfg.dropout_rate == 0)
        x = LayerNorm(cfg.layer_norm_eps, pdtype, name="attention_norm")(x + h)
        x = nn.with_logical_constraint(x, ("batch", "embed"))
        h = FeedForward(cfg, name="mlp")(x)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic or cfg.dropout_rate == 0)
        x = LayerNorm(cfg.layer_norm_eps, pdtype, name="output_norm")(x + h)
        x = nn.with_logical_constraint(x.reshape(shape), ("batch", "length", "embed"))
        return (x, None) if self.scan_step else x


class BertEncoder(nn.Module):
    """`[B, L]` token ids -> `[B, L, D]` last hidden state."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """`attention_mask`: `[B, L]` (1 = real token) or a `PackedMask` for packed rows."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings="
                f"{cfg.max_position_embeddings}; truncate inputs to that length")

        def table(name, rows, axis):
            return self.param(name, nn.with_logical_partitioning(_EMBED_INIT, (axis, "embed")),
                              (rows, cfg.hidden_size), pdtype)

        words = table("word_embedding", cfg.vocab_size, "vocab")
        positions = jnp.asarray(table("position_embedding", cfg.max_position_embeddings, "position"), dtype)
        types = jnp.asarray(table("type_embedding", cfg.type_vocab_size, "types"), dtype)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if isinstance(attention_mask, PackedMask):  # positions restart for each packed sequence
            position_embedding = jnp.take(positions, attention_mask.positions, axis=0)
        else:
            position_embedding = positions[None, :length]
        # QAT: the gathered word rows are fake-quantised, not the table (`quant.lookup_rows`).
        word_rows = lookup_rows(words, input_ids, dtype, "/".join((*self.scope.path, "word_embedding")),
                                "" if self.is_initializing() else cfg.quant_scheme, cfg.quant_block)
        x = word_rows + jnp.take(types, token_type_ids, axis=0) + position_embedding
        x = LayerNorm(cfg.layer_norm_eps, pdtype, name="embed_norm")(x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic or cfg.dropout_rate == 0)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cfg.scan_layers:
            stack = scanned_block(BertBlock, cfg)(cfg, scan_step=True, name=STACK_NAME)
            x, _ = stack(x, attention_mask, deterministic)
            return x
        block = remat_block(BertBlock, cfg.remat)
        for i in range(cfg.num_layers):
            x = block(cfg, name=f"layer_{i}")(x, attention_mask, deterministic)
        return x
