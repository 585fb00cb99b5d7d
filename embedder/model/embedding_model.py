"""`EmbeddingModel`: encoder -> masked mean pooling -> projection head (un-normalised)."""

from __future__ import annotations

import flax.linen as nn

from embedder.model.bert import BertEncoder
from embedder.model.config import ModelConfig
from embedder.model.gemma import GemmaEncoder
from embedder.model.heads import ProjectionHead, mean_pool

_ENCODERS = {"gemma": GemmaEncoder, "bert": BertEncoder}


class EmbeddingModel(nn.Module):
    """`apply(params, input_ids, attention_mask, token_type_ids=None, deterministic=True)`
    -> `[B, D]` float32, or `(emb, hidden)` with `return_hidden=True`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True,
                 return_hidden: bool = False):
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both "
                "be [batch, length]")
        hidden = _ENCODERS[cfg.family](cfg, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic)
        emb = ProjectionHead(cfg.projection_dims, name="head")(mean_pool(hidden, attention_mask))
        emb = nn.with_logical_constraint(emb, ("batch", "proj"))
        return (emb, hidden) if return_hidden else emb
