"""`EmbeddingModel`: encoder -> masked mean pooling -> projection head (un-normalised).

Padded input is `[B, L]` ids and mask; packed input (`embedder.data.packing`) is `[R, L]`
ids with the `sequence_ids` and `positions` of each token, and gives `[num_sequences, D]`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from embedder.model.attention import PackedMask
from embedder.model.bert import BertEncoder
from embedder.model.config import ModelConfig
from embedder.model.gemma import GemmaEncoder
from embedder.model.heads import ProjectionHead, mean_pool, packed_mean_pool
from embedder.model.quant import fake_quantize_params

_ENCODERS = {"gemma": GemmaEncoder, "bert": BertEncoder}


class EmbeddingModel(nn.Module):
    """`apply(params, input_ids, attention_mask, token_type_ids=None, deterministic=True)`
    -> `[B, D]` float32, or `(emb, hidden)` with `return_hidden=True`.

    Packed rows: `apply(params, ids, None, sequence_ids=..., positions=..., num_sequences=N)`
    -> `[N, D]`, equal (up to float rounding) to the padded call on the N sequences.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True,
                 return_hidden: bool = False, *, sequence_ids=None, positions=None,
                 num_sequences: int | None = None):
        cfg = self.config
        packed = sequence_ids is not None
        if packed:
            if attention_mask is not None or positions is None or num_sequences is None:
                raise ValueError("packed input takes sequence_ids, positions and num_sequences, "
                                 "and attention_mask=None")
            if not (input_ids.shape == sequence_ids.shape == positions.shape) or input_ids.ndim != 2:
                raise ValueError(f"packed input_ids {input_ids.shape}, sequence_ids {sequence_ids.shape} "
                                 f"and positions {positions.shape} must all be [rows, length]")
            attention_mask = PackedMask(jnp.asarray(sequence_ids, jnp.int32), jnp.asarray(positions, jnp.int32))
        elif attention_mask is None or input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask "
                f"{None if attention_mask is None else attention_mask.shape} must both be [batch, length]")
        hidden = self._quantized(_ENCODERS[cfg.family], "encoder")(cfg, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic)
        pooled = (packed_mean_pool(hidden, attention_mask.sequence_ids, num_sequences) if packed
                  else mean_pool(hidden, attention_mask))
        emb = self._quantized(ProjectionHead, "head")(cfg.projection_dims, name="head")(pooled)
        emb = nn.with_logical_constraint(emb, ("batch", "proj"))
        return (emb, hidden) if return_hidden else emb

    def _quantized(self, module_cls, name: str):
        """`module_cls`, or with `config.quant_scheme` the same module whose params are fake-
        quantised on the way in (`nn.map_variables`: the params tree keeps its paths and shapes;
        gradients pass straight through to the float weights). The token embedding tables come in
        float: the encoders' lookups quantise the rows they gather (`quant.lookup_rows`)."""
        cfg = self.config
        if not cfg.quant_scheme or self.is_initializing():
            return module_cls

        def fake_quantize(variables):
            if not variables.get("params"):   # an identity head has no params
                return variables
            return {**variables, "params": fake_quantize_params(variables["params"], cfg.quant_scheme,
                                                                cfg.quant_block, prefix=name, tables=False)}

        return nn.map_variables(module_cls, "params", trans_in_fn=fake_quantize)
