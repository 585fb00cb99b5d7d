"""The Gemma 1/2/3 body made bidirectional: scaled token embedding, blocks, final RMSNorm."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from embedder.model.attention import Attention
from embedder.model.config import ModelConfig
from embedder.model.feedforward import GatedFeedForward
from embedder.model.norms import RMSNorm
from embedder.model.quant import lookup_rows
from embedder.model.remat import remat_block
from embedder.model.scan import STACK_NAME, scanned_block


class GemmaBlock(nn.Module):
    """Pre-norm attention and GeGLU, with Gemma 2/3's post-norms when configured.

    `scan_step=True` makes it an `nn.scan` body: it returns `(x, None)` and, for a layer
    pattern mixing local and global layers, takes this layer's `is_local` (a bool scalar)."""

    config: ModelConfig
    layer_type: str = "global"
    scan_step: bool = False

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, is_local=None):
        cfg = self.config
        pdtype = jnp.dtype(cfg.param_dtype)
        h = RMSNorm(cfg.norm_eps, pdtype, name="pre_attention_norm")(x)
        h = Attention(cfg, self.layer_type, name="attention")(h, key_mask, deterministic, is_local)
        if cfg.use_post_attn_norm:
            h = RMSNorm(cfg.norm_eps, pdtype, name="post_attention_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic or cfg.dropout_rate == 0)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        h = RMSNorm(cfg.norm_eps, pdtype, name="pre_ffw_norm")(x)
        h = GatedFeedForward(cfg, name="mlp")(h)
        if cfg.use_post_ffw_norm:
            h = RMSNorm(cfg.norm_eps, pdtype, name="post_ffw_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic or cfg.dropout_rate == 0)
        x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
        return (x, None) if self.scan_step else x


class GemmaEncoder(nn.Module):
    """`[B, L]` token ids -> `[B, L, D]` last hidden state (after the final norm)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        """`attention_mask`: `[B, L]` (1 = real token) or an `attention.PackedMask` for packed
        rows (RoPE then rotates by the positions within each sequence)."""
        del token_type_ids  # gemma has no segment embeddings
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
        # QAT: the gathered rows are fake-quantised, not the table (`quant.lookup_rows`).
        x = lookup_rows(table, input_ids, dtype, "/".join((*self.scope.path, "embedding")),
                        "" if self.is_initializing() else cfg.quant_scheme, cfg.quant_block)
        # The sqrt(d) factor is cast to the compute dtype first, as HF does (55.5 in bf16).
        x = x * jnp.asarray(cfg.hidden_size ** 0.5, dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if cfg.scan_layers:
            x = self._scanned_layers(x, attention_mask, deterministic)
        else:
            block = remat_block(GemmaBlock, cfg.remat)
            for i, layer_type in enumerate(cfg.layer_types):
                x = block(cfg, layer_type, name=f"layer_{i}")(x, attention_mask, deterministic)
        return RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype), name="final_norm")(x)

    def _scanned_layers(self, x, attention_mask, deterministic):
        cfg = self.config
        kinds = set(cfg.layer_types)
        if len(kinds) == 1:  # one kind: the window and RoPE base stay static, as unrolled
            stack = scanned_block(GemmaBlock, cfg)(cfg, kinds.pop(), scan_step=True, name=STACK_NAME)
            x, _ = stack(x, attention_mask, deterministic)
            return x
        is_local = jnp.asarray([t == "local" for t in cfg.layer_types])
        stack = scanned_block(GemmaBlock, cfg, per_layer_inputs=1)(
            cfg, "global", scan_step=True, name=STACK_NAME)
        x, _ = stack(x, attention_mask, deterministic, is_local)
        return x
